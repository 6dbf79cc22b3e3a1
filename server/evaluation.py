"""Central evaluation of the global model on the held-out test set: clean and, optionally, robust.

Clean: test loss and accuracy, every ``eval.every`` rounds (and the last).

Robust (``eval.robust``): accuracy of the global model on white-box adversarial examples made
against it — PGD (``robust_accuracy``) and, with ``eval.fgsm``, FGSM (``fgsm_accuracy``) — on
the rounds that have a central evaluation and are multiples of ``eval.robust_every`` (and the
last round); the other rows carry ``None``. Whether it runs:

- ``eval.robust = true`` / ``false``: as set;
- ``eval.robust = "auto"`` (the default): the strategy method's ``robust_eval_default`` (``True`` for
  ``fat``, ``False`` for the others).

The attack's ε and norm, unless ``eval.attack_eps`` / ``eval.attack_norm`` set them (default "auto"), come from
the strategy method's ``threat_model()`` if it has one (``fat``: its training ε and norm), else from
the task's default threat model (:data:`DEFAULT_THREATS`), so FedAvg and FAT with default
settings are attacked identically. PGD is stronger than training: ``eval.attack_steps`` (20)
steps of ``eval.attack_step_size`` (2.5·ε/steps when "auto") from a random start. The random
starts come from a private generator derived from (run seed, round, "robust-eval").
:func:`evaluation_summary` records the resolved attacks and the final robust accuracies in
summary.json.
"""

from __future__ import annotations

from typing import Any

import torch

from stamen.core import derive_seed
from stamen.tasks.attacks import AttackConfig, robust_accuracy
from stamen.tasks.task import evaluate

#: default threat model per ``task.dataset``: (norm, ε in input units).
#: - MNIST-like images in [0, 1]: Madry et al.'s ℓ∞ ε = 0.3 (Fashion-MNIST: the usual 0.1);
#: - CIFAR-10: ℓ∞ ε = 8/255;
#: - digits (8×8 images, pixels in [0, 1], 17 grey levels): ℓ∞ ε = 0.2, about 3 grey levels. Measured
#:   (MLP, 20 clients, 20 rounds): FedAvg keeps ~10% accuracy under PGD-20 at 0.2 (62% at 0.1), so
#:   0.2 is where adversarial training visibly matters; see benchmarks/fat_study.py;
#: - FedProx synthetic (60 raw Gaussian features, not standardized; per-feature std over the pooled
#:   training data ≈ 1.3–2.2): ℓ∞ ε = 0.3, about 0.2 pooled standard deviations per feature. Measured
#:   (MLP, 20 clients, 20 rounds): FedAvg 79% clean / 52% under PGD-20 at 0.3 (71% at 0.1).
DEFAULT_THREATS: dict[str, tuple[str, float]] = {
    "digits": ("linf", 0.2),
    "mnist": ("linf", 0.3),
    "fashion_mnist": ("linf", 0.1),
    "cifar10": ("linf", 8 / 255),
    "synthetic": ("linf", 0.3),
    "synthetic_iid": ("linf", 0.3),
}
#: for other datasets: ℓ∞ ε = this fraction of the input range (hi − lo)
DEFAULT_EPS_FRACTION = 0.1


def default_threat_model(dataset: str, input_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The task's default attack ``{"norm", "eps"}`` (``input_range`` is needed for unlisted datasets)."""
    if dataset in DEFAULT_THREATS:
        norm, eps = DEFAULT_THREATS[dataset]
        return {"norm": norm, "eps": float(eps)}
    if input_range is None:
        raise ValueError(f"dataset {dataset!r} has no default threat model; pass its input_range "
                         f"or set eval.attack_eps / strategy.eps")
    lo, hi = input_range
    return {"norm": "linf", "eps": float(DEFAULT_EPS_FRACTION * (hi - lo))}


def robust_enabled(cfg, method=None) -> bool:
    if cfg.eval.robust != "auto":
        return bool(cfg.eval.robust)
    return bool(getattr(method, "robust_eval_default", False))


def eval_attacks(cfg, task, strategy=None) -> dict[str, AttackConfig]:
    """The attacks of the robust evaluation: ``{"pgd": ..., "fgsm": ...}`` (fgsm only with eval.fgsm)."""
    threat_fn = getattr(strategy, "threat_model", None)
    threat = threat_fn() if callable(threat_fn) else default_threat_model(cfg.task.dataset, task.data.input_range)
    eps = float(threat["eps"]) if cfg.eval.attack_eps == "auto" else float(cfg.eval.attack_eps)
    norm = threat["norm"] if cfg.eval.attack_norm == "auto" else cfg.eval.attack_norm
    step_size = None if cfg.eval.attack_step_size == "auto" else float(cfg.eval.attack_step_size)
    attacks = {"pgd": AttackConfig(kind="pgd", norm=norm, eps=eps, steps=cfg.eval.attack_steps,
                                   step_size=step_size, random_start=True)}
    if cfg.eval.fgsm:
        attacks["fgsm"] = AttackConfig(kind="fgsm", norm=norm, eps=eps)
    return attacks


def _robust_round(cfg, server_round: int) -> bool:
    return server_round % cfg.eval.robust_every == 0 or server_round == cfg.run.rounds


def central_evaluation(model, task, cfg, server_round: int, strategy=None) -> dict[str, Any]:
    """Test loss and accuracy of ``model`` (holding the global weights), plus robust accuracies when on."""
    loss, acc = evaluate(model, *task.data.test, cfg.eval.batch_size)
    row: dict[str, Any] = {"test_loss": loss, "test_accuracy": acc}
    if robust_enabled(cfg, strategy):
        attacks = eval_attacks(cfg, task, strategy)
        names = {"pgd": "robust_accuracy", "fgsm": "fgsm_accuracy"}
        if _robust_round(cfg, server_round):
            X, Y = task.data.test
            if cfg.eval.robust_samples:
                X, Y = X[:cfg.eval.robust_samples], Y[:cfg.eval.robust_samples]
            lo, hi = task.data.input_range
            for kind, attack in attacks.items():
                gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "robust-eval", kind))
                row[names[kind]] = robust_accuracy(model, X, Y, attack, (float(lo), float(hi)),
                                                   cfg.eval.batch_size, gen)
        else:
            row.update({names[kind]: None for kind in attacks})
    return row


def evaluation_summary(cfg, task, strategy, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Entries for summary.json: the robust evaluation's attacks and final/best robust accuracies."""
    if not robust_enabled(cfg, strategy):
        return {}
    out: dict[str, Any] = {"robust_eval": {kind: a.describe() for kind, a in eval_attacks(cfg, task, strategy).items()}}
    out["robust_eval"].update(every=cfg.eval.robust_every,
                              samples=cfg.eval.robust_samples or len(task.data.test[1]))
    describe = getattr(strategy, "describe_training_attack", None)
    if callable(describe):
        out["train_attack"] = describe()
    for key in ("robust_accuracy", "fgsm_accuracy"):
        done = [r[key] for r in rows if r.get(key) is not None]
        if done:
            out[f"final_{key}"] = done[-1]
            out[f"best_{key}"] = max(done)
    return out
