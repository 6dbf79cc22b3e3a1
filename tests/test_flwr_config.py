"""`flwr run` takes Stamen's config keys as Flower run-config keys: pyproject.toml declares every one
(generated, kept current here), and a Flower-style flat run config reaches the same config as --set."""

from __future__ import annotations

import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from stamen.config import from_flat, load
from stamen.flwr_config import pyproject_block, run_config_keys

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_stamen_key():
    text = (ROOT / "pyproject.toml").read_text()
    assert text[text.index("[tool.flwr.app.config]"):] == pyproject_block(), \
        "regenerate with: python -c 'from stamen.flwr_config import pyproject_block; print(pyproject_block())'"


def test_typed_run_config_keys_give_the_same_config_as_set():
    """Flower's own parsing and fusing of `--run-config`, then Stamen's from_flat."""
    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    overrides = parse_config_args(["strategy.name='fedprox' strategy.proximal_mu=0.1 task.alpha=0.3 "
                                   "federation.fraction_train=0.5 compression.codec='countsketch' compression.rows=3"])
    fused = fuse_dicts(declared, overrides)  # raises for a key pyproject.toml does not declare
    got = from_flat({**fused, "config-file": str(ROOT / "stamen/configs/default.toml")})
    want = load(ROOT / "stamen/configs/default.toml",
                ["strategy.name=fedprox", "strategy.proximal_mu=0.1", "task.alpha=0.3", "federation.fraction_train=0.5",
                 "compression.codec=countsketch", "compression.rows=3"])
    assert got == want
    assert {"strategy.proximal_mu", "compression.rows", "privacy.target_epsilon"} <= {
        f"{s}.{k}" for s, keys in run_config_keys().items() for k in keys}
