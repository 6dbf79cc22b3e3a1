"""``stamen export DIR --format torchscript|onnx``: the final model of a run, outside Stamen.

Every run writes ``model.safetensors`` (the global model's state dict, fp32) at its end; this
module rebuilds the task's model from the run's ``config.toml``, loads those weights (or, for a
run that did not finish, the checkpoint's) and exports it with PyTorch's own exporters:
TorchScript (``torch.jit.trace``, no extra package) or ONNX (``torch.onnx.export``, which needs
the ``onnx`` and ``onnxscript`` packages: ``pip install 'stamen[export]'``). The exported model is
checked against the PyTorch model on a test example before this returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("torchscript", "onnx")


class ExportError(ValueError):
    """A run that cannot be exported (no model, an unknown format, a missing package)."""


def load_final_model(run_dir: str | Path):
    """(model with the run's final weights, one test input batch) of a run directory."""
    from stamen.config import load
    from stamen.server.results import RunDirectory
    from stamen.tasks.task import load_task, set_weights

    run = RunDirectory(run_dir)
    if not run.config_path.is_file():
        raise ExportError(f"{run.path} is not a Stamen run directory (no config.toml)")
    cfg = load(run.config_path)
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    if run.model_path.is_file():
        weights, _ = run.read_model()
    elif run.checkpoint_path.is_file():
        weights = run.load_checkpoint(layout=task.layout)["arrays"]
    else:
        raise ExportError(f"{run.path} has neither model.safetensors nor a checkpoint: nothing to export")
    model = task.new_model()
    set_weights(model, weights)
    model.eval()
    return model, torch.as_tensor(task.data.test[0][:2])


def export_model(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export the run's final model; return the written file."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, example = load_final_model(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / ("model.torchscript.pt" if fmt == "torchscript"
                                                                else "model.onnx")
    with torch.no_grad():
        expected = model(example).numpy()
    if fmt == "torchscript":
        traced = torch.jit.trace(model, example)
        traced.save(str(target))
        got = torch.jit.load(str(target))(example).detach().numpy()
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError("--format onnx needs the 'onnx' and 'onnxscript' packages "
                              "(pip install 'stamen[export]')") from None
        from onnx.reference import ReferenceEvaluator

        batch = torch.export.Dim("batch", min=1)  # any batch size, not the example's
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, dynamic_shapes=({0: batch},))
        program.save(str(target))
        evaluator = ReferenceEvaluator(str(target))
        got = evaluator.run(None, {evaluator.input_names[0]: example.numpy()})[0]
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ExportError(f"the exported {fmt} model disagrees with the PyTorch model (max |Δ| "
                          f"{float(np.abs(got - expected).max()):.3g})")
    return target
