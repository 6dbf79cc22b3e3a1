"""The run directory: config, per-round metrics, summary, checkpoint, plots.

Layout of ``DIR``::

    config.toml      the resolved run config
    metrics.jsonl    one JSON object per round
    summary.json     final metrics, totals, versions, seed
    checkpoint.npz   server state after the last complete round (for --resume); data only,
                     never pickle: the format is in :mod:`stamen.server.checkpoint`
    model.safetensors the final global model: the model's state dict (safetensors), its
                     metadata naming the round and the task (``stamen export`` turns it into
                     TorchScript or ONNX)
    *.png            accuracy / loss per round, accuracy against cumulative bytes

Every file is written atomically (temporary file + fsync + ``os.replace``), so a crash or a
full disk never leaves a half-written file; metrics.jsonl is rewritten whole each round for
the same reason (it is small).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


class CheckpointError(ValueError):
    """A checkpoint (or the metrics beside it) that cannot be written or resumed from; the message names the file."""


class OutputDirError(ValueError):
    """A results directory that cannot be created or written."""


def atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (bytes, text, or a function that writes to a binary file) to ``path`` atomically.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_writable_dir(path: str | Path, what: str = "results directory") -> Path:
    """Check that ``path`` can be created (if missing) and written, leaving no trace; raise :class:`OutputDirError`.

    It creates the missing directories and one temporary file, then removes what it created,
    so a run refused later (for a bad config, say) leaves nothing behind.
    """
    path = Path(path)
    created: list[Path] = []
    try:
        for p in [*reversed(path.parents), path]:
            if p.exists() and not p.is_dir():
                raise OutputDirError(f"cannot use {path} as the {what}: {p} exists and is not a directory; "
                                     "choose another --out")
            if not p.exists():
                p.mkdir()
                created.append(p)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".stamen-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise OutputDirError(f"cannot write the {what} {path}: {reason[:1].lower() + reason[1:]} "
                             f"({err.filename or path}); choose another --out") from None
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
    return path


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
        from stamen.server.checkpoint import CHECKPOINT_FILE

        return self.path / CHECKPOINT_FILE

    @property
    def legacy_checkpoint_path(self) -> Path:
        """Where Stamen before checkpoint format 2 pickled its state (refused on load; see convert-checkpoint)."""
        from stamen.server.checkpoint import LEGACY_CHECKPOINT_FILE

        return self.path / LEGACY_CHECKPOINT_FILE

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a damaged line raises :class:`CheckpointError` naming it (nothing is changed)."""
        p = self.metrics_path
        if not p.exists():
            return []
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = p.read_bytes()[: err.start].count(b"\n") + 1
            raise CheckpointError(f"{p}, line {line}: not UTF-8 text; the file is damaged. " + _METRICS_HINT) from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise CheckpointError(f"{p}, line {n}: not a JSON object ({getattr(err, 'msg', err)}, column "
                                      f"{getattr(err, 'colno', '?')}); the file is damaged. " + _METRICS_HINT) from None
            if not isinstance(row, dict) or type(row.get("round")) is not int:
                raise CheckpointError(f"{p}, line {n}: not a round's metrics (a JSON object with an integer "
                                      f"\"round\"); the file is damaged. " + _METRICS_HINT)
            rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    def write_model(self, arrays: dict[str, Any], metadata: dict[str, str]) -> None:
        """The global model's state dict as safetensors (fp32 tensors by name), written atomically."""
        import numpy as np
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        atomic_write(self.model_path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))

    def read_model(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(state dict as numpy arrays, metadata) of ``model.safetensors``; CheckpointError if unreadable."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.model_path), framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"cannot read the model {self.model_path}: {err}") from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` (a tree: see :mod:`stamen.server.checkpoint`) atomically; raise :class:`CheckpointError`
        if it holds a non-tree object or cannot be written (the previous checkpoint is then intact)."""
        from stamen.server.checkpoint import write_checkpoint

        write_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self, *, layout: Any = None) -> dict[str, Any]:
        """The state saved by :meth:`save_checkpoint` (``round``, ``arrays``, ``fingerprint`` checked; the rest as saved).

        ``layout`` (the model's ``Layout``, or ``{name: shape}``) checks ``arrays`` against the model.
        Any defect, and a directory holding only an old pickled ``checkpoint.pkl``, raises
        :class:`CheckpointError`.
        """
        from stamen.server.checkpoint import LegacyCheckpointError, legacy_message, read_checkpoint

        p = self.checkpoint_path
        if not p.is_file():
            if self.legacy_checkpoint_path.is_file():
                raise LegacyCheckpointError(legacy_message(self.legacy_checkpoint_path))
            raise CheckpointError(f"no checkpoint at {p}: nothing to resume (was the run started with this --out?)")
        state = read_checkpoint(p, layout=layout)
        problems = [f"{key!r} is missing or not {kind.__name__}"
                    for key, kind in (("round", int), ("arrays", dict), ("fingerprint", str))
                    if not isinstance(state, dict) or type(state.get(key)) is not kind]
        if problems:
            raise CheckpointError(f"checkpoint {p} is not a Stamen run state: {'; '.join(problems)}")
        return state


_METRICS_HINT = ("Nothing was changed. Repair or delete that line (the rounds before it are intact), or start the "
                 "run again with another --out.")


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
