"""Central pretraining of the GPT on the corpus's held-apart slice, with its weight cache.

:func:`pretrain` trains a :class:`~stamen.tasks.lm_model.GPT` on ``corpus.pretrain_tokens``
and stores the weights on disk as ``gpt-pretrain-<hash>.pt``, keyed by everything they depend
on (:func:`pretrain_key`) and written atomically; an unusable cache file is rebuilt with a
``RuntimeWarning``. :func:`pretrained_state` is the federated ``gpt`` model's starting point:
the pretrained weights of a task's ``LMModelSpec`` with the fixed ``PRETRAIN_*`` settings,
from that disk cache (``default_cache_dir``) and memoised per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stamen.core import derive_seed
from stamen.tasks.lm_corpus import LMCorpus
from stamen.tasks.lm_model import GPT, GPTConfig, train_lm

if TYPE_CHECKING:
    from stamen.tasks.lm import LMModelSpec

# -- central pretraining with an on-disk cache ----------------------------------------------------

#: part of every cache key; it keeps the name of the module this code was first written in, so
#: caches written before the task was split into modules stay valid
_CACHE_FORMAT = "stamen.tasks.lm.pretrain/1"
#: the corpus parameters that shape ``pretrain_tokens`` (with their sha256, part of the cache key)
_PRETRAIN_CORPUS_PARAMS = ("source", "python", "max_pretrain_bytes", "pretrain_groups", "pretrain_seed")


@dataclass
class PretrainResult:
    model: GPT
    losses: list[float]  # per step of the run that produced the weights
    seconds: float  # wall time of that run (not of the cache load)
    from_cache: bool
    cache_path: Path | None


def pretrain_key(model_cfg: GPTConfig, corpus: LMCorpus, steps: int, lr: float, seed: int,
                 batch_size: int) -> dict[str, Any]:
    """Everything the pretrained weights depend on; its hash names the cache file.

    Of the corpus only what shapes the pretraining slice counts (not the client or test split),
    so federations of any size share one cached model.
    """
    return {
        "format": _CACHE_FORMAT, "model": asdict(model_cfg),
        "corpus": {k: corpus.params.get(k) for k in _PRETRAIN_CORPUS_PARAMS},
        "pretrain_sha256": hashlib.sha256(corpus.pretrain_tokens.numpy().tobytes()).hexdigest(),
        "steps": int(steps), "lr": float(lr), "seed": int(seed), "batch_size": int(batch_size),
        "python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _save_atomically(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_cached(path: Path, key: dict[str, Any], model_cfg: GPTConfig) -> PretrainResult | None:
    """The cached result, or None (with a warning saying why) when the file is unusable."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
            raise ValueError(f"not a {_CACHE_FORMAT} file")
        if blob.get("key") != json.dumps(key, sort_keys=True):
            raise ValueError("it was built for different settings (model, corpus, steps, seed or versions)")
        model = GPT(model_cfg)
        model.load_state_dict(blob["state_dict"])
        return PretrainResult(model, list(blob["losses"]), float(blob["seconds"]), True, path)
    except Exception as err:  # noqa: BLE001 — any unreadable cache is rebuilt, loudly
        warnings.warn(f"pretraining cache {path} is unusable ({type(err).__name__}: {err}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def pretrain(model_cfg: GPTConfig, corpus: LMCorpus, steps: int = 300, lr: float = 3e-3, seed: int = 0,
             cache_dir: str | Path | None = None, *, batch_size: int = 16) -> PretrainResult:
    """Central pretraining of a GPT on the corpus's held-apart slice, cached on disk.

    The model is initialised from ``derive_seed(seed, "gpt-init")`` and trained with
    ``train_lm`` on ``corpus.pretrain_tokens``. With ``cache_dir`` the weights are
    stored as ``gpt-pretrain-<hash>.pt``, keyed by ``pretrain_key`` (model config,
    corpus parameters and pretraining bytes, steps, lr, batch size, seed, Python and
    torch versions), and written atomically. A cache file that cannot be read or was
    built for other settings is rebuilt with a ``RuntimeWarning``.
    """
    key = pretrain_key(model_cfg, corpus, steps, lr, seed, batch_size)
    path = Path(cache_dir) / f"gpt-pretrain-{_key_hash(key)[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        cached = _load_cached(path, key, model_cfg)
        if cached is not None:
            return cached
    model = GPT(model_cfg, seed=derive_seed(seed, "gpt-init"))
    start = time.perf_counter()
    losses = train_lm(model, corpus.pretrain_tokens, steps=steps, lr=lr, batch_size=batch_size,
                      seed=derive_seed(seed, "gpt-pretrain-batches"))
    seconds = time.perf_counter() - start
    model.eval()
    if path is not None:
        _save_atomically({"format": _CACHE_FORMAT, "key": json.dumps(key, sort_keys=True),
                          "state_dict": model.state_dict(), "losses": losses, "seconds": seconds}, path)
    return PretrainResult(model, losses, seconds, False, path)


# -- the federated ``gpt`` model's starting point -------------------------------------------------

#: pretraining settings of the ``gpt`` model's starting point (task.pretrain_steps sets the steps)
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 16
PRETRAIN_SEED = 0  # the base model is one fixed artifact, whatever the run seed (like a public checkpoint)


def default_cache_dir() -> Path:
    """``$STAMEN_CACHE_DIR``, else ``~/.cache/stamen`` (absolute: Ray workers may run elsewhere)."""
    env = os.environ.get("STAMEN_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "stamen"


_PRETRAINED: dict[str, dict[str, torch.Tensor]] = {}


def pretrained_state(spec: LMModelSpec) -> dict[str, torch.Tensor]:
    """The state dict of the spec's centrally pretrained GPT (``pretrain``, disk-cached, memoised per process)."""
    if spec.corpus is None:
        raise ValueError("a pretrained gpt needs the corpus's pretraining slice; build it through the 'stdlib' dataset "
                         "or set task.pretrained=false")
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    key = _key_hash(pretrain_key(spec.config, spec.corpus, spec.pretrain_steps, PRETRAIN_LR, PRETRAIN_SEED,
                                 PRETRAIN_BATCH)) + str(cache_dir)
    if key not in _PRETRAINED:
        result = pretrain(spec.config, spec.corpus, spec.pretrain_steps, PRETRAIN_LR, PRETRAIN_SEED, cache_dir,
                          batch_size=PRETRAIN_BATCH)
        _PRETRAINED.clear()  # one base model per process at a time
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return _PRETRAINED[key]
