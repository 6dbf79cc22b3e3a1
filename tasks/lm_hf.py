"""The Hugging Face path of the LM task, for users with network access.

:func:`load_hf_text_dataset` reads a text dataset from the hub, a local builder or a saved
dataset (``datasets`` is a dependency); :func:`texts_to_tokens` turns texts into byte tokens;
:func:`hf_causal_lm` loads a hub checkpoint (``transformers`` is optional and imported lazily).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from stamen.tasks.lm_corpus import ByteTokenizer


def load_hf_text_dataset(name: str, split: str = "train", cache_dir: str | Path | None = None, *,
                         data_files: Any = None, text_field: str = "text"):
    """A ``datasets.Dataset`` with a text column, from the hub, a local builder or a saved dataset.

    ``name`` may be a hub id (``"wikitext"``, needs network), a packaged builder with
    local files (``"json"`` with ``data_files=...``) or a directory written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (loaded with
    ``load_from_disk``; for a DatasetDict ``split`` picks the split).
    """
    import datasets

    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"saved dataset {name} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split, data_files=data_files,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    if text_field not in ds.column_names:
        raise KeyError(f"dataset {name!r} has no column {text_field!r}; its columns are {ds.column_names} "
                       f"(pass text_field=)")
    return ds


def texts_to_tokens(texts: Iterable[str], max_bytes: int | None = None,
                    tokenizer: ByteTokenizer | None = None) -> torch.Tensor:
    """Concatenate texts (blank line between) into one token tensor (uint8 without specials)."""
    tokenizer = tokenizer or ByteTokenizer()
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n"))
        if max_bytes is not None and len(ids) >= max_bytes:
            ids = ids[:max_bytes]
            break
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int64
    return torch.tensor(ids, dtype=dtype)


def hf_causal_lm(checkpoint: str, cache_dir: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``transformers.AutoModelForCausalLM.from_pretrained(checkpoint)``; transformers is optional."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf_causal_lm needs the optional package 'transformers' (pip install transformers); "
                          "the built-in GPT (stamen.tasks.lm.GPT) works without it") from err
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
