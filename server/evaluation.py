"""Central evaluation of the global model on the held-out test set."""

from __future__ import annotations

from typing import Any

from stamen.tasks.task import evaluate


def central_evaluation(model, task, cfg, server_round: int) -> dict[str, Any]:
    """Test loss and accuracy of ``model`` (holding the global weights) for metrics.jsonl."""
    loss, acc = evaluate(model, *task.data.test, cfg.eval.batch_size)
    return {"test_loss": loss, "test_accuracy": acc}
