"""The Stamen ServerApp.

Under ``stamen run`` (simulation) the app is built by :func:`make_server_app` with the
config, output directory and a per-round callback passed by closure. Under ``flwr run``
(simulation or SuperLink deployment) the module-level ``app`` reads the config from
Flower's ``context.run_config`` (``config-file`` plus flattened ``section.key`` entries).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from stamen.config import StamenConfig, from_flat
from stamen.server.loop import run_federation


def default_out_dir(cfg: StamenConfig) -> Path:
    return Path(cfg.run.out_dir or f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def make_server_app(cfg: StamenConfig | None = None, out_dir: str | Path | None = None, *, resume: bool = False,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    result: dict[str, Any] | None = None, carriers: int | None = None) -> ServerApp:
    """The ServerApp; ``carriers``: the simulation hosts the clients as virtual nodes on that many
    SuperNodes (server/virtual_grid.py), None: one SuperNode per client."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else from_flat(dict(context.run_config))
        out = Path(out_dir) if out_dir is not None else default_out_dir(run_cfg)
        if carriers:
            from stamen.server.virtual_grid import VirtualGrid

            grid = VirtualGrid(grid, run_cfg, carriers)
        try:
            summary = run_federation(grid, run_cfg, out, resume=resume, on_round=on_round)
            if result is not None:
                result["summary"] = summary
        except BaseException as err:  # surfaced by the caller: run_simulation swallows errors
            if result is not None:
                result["error"] = err
            raise

    return app


app = make_server_app()
