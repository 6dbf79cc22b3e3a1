"""The run directory: config, per-round metrics, summary, checkpoint, plots.

Layout of ``DIR``::

    config.toml      the resolved run config
    metrics.jsonl    one JSON object per round
    summary.json     final metrics, totals, versions, seed
    checkpoint.pkl   server state after the last complete round (for --resume)
    *.png            accuracy / loss per round, accuracy against cumulative bytes

Every file is written atomically (temporary file + ``os.replace``), so a crash never
leaves a half-written file; metrics.jsonl is rewritten whole each round for the same
reason (it is small).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pkl"

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint_path, pickle.dumps({"format": CHECKPOINT_FORMAT, **state}))

    def load_checkpoint(self) -> dict[str, Any]:
        p = self.checkpoint_path
        if not p.is_file():
            raise CheckpointError(f"no checkpoint at {p}: nothing to resume (was the run started with this --out?)")
        try:
            state = pickle.loads(p.read_bytes())
        except Exception as err:
            raise CheckpointError(f"checkpoint {p} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {p} has an unknown format; expected format {CHECKPOINT_FORMAT}")
        return state


def write_plots(run: RunDirectory) -> list[Path]:
    """Accuracy and loss per round, and accuracy against cumulative uplink+downlink bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run.read_metrics() if r.get("test_accuracy") is not None]
    if not rows:
        return []
    rounds = [r["round"] for r in rows]
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(rounds, [r["test_accuracy"] for r in rows], marker=".")
    axes[0].set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    axes[1].plot(rounds, [r["test_loss"] for r in rows], marker=".", label="test")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        axes[1].plot(*zip(*train), marker=".", label="train")
    axes[1].set(xlabel="round", ylabel="cross-entropy", title="Loss")
    axes[1].legend()
    fig.tight_layout()
    out.append(_save(fig, run.path / "accuracy_loss.png"))
    plt.close(fig)

    cum, total = [], 0
    for r in rows:
        total += r.get("uplink_bytes", 0) + r.get("downlink_bytes", 0)
        cum.append(total)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(cum, [r["test_accuracy"] for r in rows], marker=".")
    ax.set(xlabel="cumulative bytes (uplink + downlink)", ylabel="test accuracy", title="Accuracy vs bytes")
    ax.set_xscale("log")
    fig.tight_layout()
    out.append(_save(fig, run.path / "accuracy_vs_bytes.png"))
    plt.close(fig)
    return out


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return path
