"""The ``stamen`` command: run federations, list plugins."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stamen: federated learning on Flower — simulation, deployment and trade-off studies.")
console = Console()
err_console = Console(stderr=True)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


def _fail(err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(err)
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (config, data, checkpoint), reported without a traceback."""
    from stamen.config import ConfigError
    from stamen.experiment import RunFailed
    from stamen.server.results import CheckpointError
    from stamen.sketching.codec import PayloadError
    from stamen.strategies.registry import StrategyConfigError
    from stamen.tasks.data import DataError

    return (ConfigError, DataError, StrategyConfigError, CheckpointError, PayloadError, RunFailed, ValueError)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Run config (TOML). Default: the embedded digits/FedAvg config."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory (default runs/<name>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in DIR from its last complete round."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and Flower's log."),
) -> None:
    """Run one federation in simulation and write its results directory."""
    from stamen import config as C
    from stamen.experiment import preflight, simulate
    from stamen.server.app import default_out_dir

    try:
        if resume is not None:
            if config is not None:
                raise C.ConfigError("--resume DIR takes its config from DIR/config.toml; drop the CONFIG argument")
            cfg = C.load(resume / "config.toml", set_)
            out_dir = resume
            if out is not None and out != resume:
                raise C.ConfigError("--out must be omitted or equal to the --resume directory")
        else:
            cfg = C.load(config or DEFAULT_CONFIG, set_)
            out_dir = out or default_out_dir(cfg)
            if (out_dir / "metrics.jsonl").exists():
                raise C.ConfigError(f"{out_dir} already holds a run; use --resume {out_dir} or another --out")
        preflight(cfg)
    except user_errors() as err:
        _fail(err, debug)

    console.print(f"[bold]stamen[/] {cfg.strategy.name} on {cfg.task.dataset} ({cfg.federation.clients} clients, "
                  f"{cfg.run.rounds} rounds, codec {cfg.compression.codec}) → {out_dir}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold blue]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        bar = progress.add_task("rounds", total=cfg.run.rounds, acc="starting Ray…")
        if resume is not None:
            from stamen.server.results import RunDirectory

            progress.update(bar, completed=len(RunDirectory(out_dir).read_metrics()))

        def on_round(row: dict) -> None:
            acc = row.get("test_accuracy")
            text = f"acc {acc:.4f}" if acc is not None else ""
            progress.update(bar, completed=row["round"], acc=text)

        try:
            summary = simulate(cfg, out_dir, resume=resume is not None, on_round=on_round, verbose=debug)
        except user_errors() as err:
            _fail(err, debug)
    _print_summary(summary, out_dir)


def _print_summary(summary: dict, out_dir: Path) -> None:
    table = Table(title=f"Run summary ({out_dir})", show_header=False)
    for key in ("strategy", "codec", "dataset", "model", "parameters", "rounds", "final_test_accuracy",
                "best_test_accuracy", "final_test_loss", "total_uplink_bytes", "total_downlink_bytes",
                "total_rejected", "wall_s"):
        v = summary.get(key)
        table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@app.command("list")
def list_() -> None:
    """List the registered strategies, datasets, partitions, models and codecs."""
    from stamen.sketching.codec import CODECS, make_codec
    from stamen.strategies.registry import STRATEGIES, _load_plugins
    from stamen.tasks.data import DATASETS, PARTITIONS
    from stamen.tasks.models import MODELS

    _load_plugins()
    make_codec("dense")  # loads the codec modules
    t = Table(title="strategies (strategy.name) and their strategy.* options")
    t.add_column("name"), t.add_column("options"), t.add_column("what it is")
    for name, spec in sorted(STRATEGIES.items()):
        opts = ", ".join(f"{k}={f.default!r}" for k, f in spec.options.model_fields.items())
        t.add_row(name, opts or "-", spec.summary)
    console.print(t)
    t = Table(title="datasets (task.dataset)")
    t.add_column("name"), t.add_column("what it is")
    for name, fn in sorted(DATASETS.items()):
        t.add_row(name, (fn.__doc__ or "").strip().splitlines()[0])
    console.print(t)
    console.print("partitions (task.partition): " + ", ".join(["auto", "natural", *sorted(PARTITIONS)]))
    console.print("models (task.model): " + ", ".join(sorted(MODELS)))
    t = Table(title="codecs (compression.codec)")
    t.add_column("name"), t.add_column("linear"), t.add_column("what it is")
    for name, cls in sorted(CODECS.items()):
        t.add_row(name, str(cls.linear), (cls.__doc__ or "").strip().splitlines()[0])
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
