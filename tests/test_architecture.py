"""ARCHITECTURE.md stays true: its capability table is the registry's, and its one-file plugin
example, installed as a real package, is found through the entry points and runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stamen.strategies.registry import capability_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"


def test_the_capability_table_is_generated_from_the_registry():
    text = DOC.read_text()
    table = text.split("<!-- capabilities:start -->\n", 1)[1].split("<!-- capabilities:end -->", 1)[0]
    assert table == capability_table(), "regenerate it with: stamen list --capabilities"


def example_files() -> dict[str, str]:
    """The fenced blocks of ARCHITECTURE.md that start with ``# file: <path>``."""
    blocks = re.findall(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", DOC.read_text(), re.S)
    return {path: body for path, body in blocks}


def _install(tmp_path: Path, files: dict[str, str], name: str) -> Path:
    pkg, site = tmp_path / name, tmp_path / f"{name}-site"
    for path, body in files.items():
        (pkg / path).parent.mkdir(parents=True, exist_ok=True)
        (pkg / path).write_text(body)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(pkg)], check=True, capture_output=True)
    return site


def _python(site: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


RUN = """
import json, sys, tempfile
from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
cfg = load(overrides=["strategy.name=fedavg_lr", "strategy.server_lr=0.5", "federation.clients=4", "run.rounds=4",
                      "task.hidden=32", "task.local_epochs=1", *sys.argv[1:]])
out = tempfile.mkdtemp()
summary = run_federation(InProcessGrid(cfg), cfg, out)
print(json.dumps({"summary": summary, "rows": RunDirectory(out).read_metrics()}))
"""


@pytest.mark.slow
def test_the_one_file_plugin_example_installs_and_runs(tmp_path):
    import json

    files = example_files()
    assert set(files) == {"stamen_example/__init__.py", "pyproject.toml"}
    site = _install(tmp_path, files, "example")
    runs = {}
    for name, args in {"sign": ["compression.codec=sign"], "dense": [], "head": ["strategy.head_only=true", "task.lr=0.5"]}.items():
        done = _python(site, RUN, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in runs.items():
        assert [r["rejected"] for r in result["rows"]] == [0] * 4, name
        # it learns (10 classes: chance is 0.1); sign steps of size mean|Δ| learn slowest; the head alone (a
        # linear model on 32 random ReLU features) takes a larger step to learn within four rounds
        assert result["summary"]["final_test_accuracy"] > (0.15 if name == "sign" else 0.3), name
    assert runs["sign"]["summary"]["codec"] == "sign"
    # one bit per parameter plus a scale: the uplink is a small fraction of the dense run's
    assert runs["sign"]["summary"]["total_uplink_bytes"] < 0.1 * runs["dense"]["summary"]["total_uplink_bytes"]
    # the head-only trainer leaves every tensor but the last layer at the global weights: Δ there is exactly 0
    assert runs["head"]["summary"]["final_test_accuracy"] != runs["dense"]["summary"]["final_test_accuracy"]
    listing = _python(site, "from stamen.cli import app; app(['list'])")
    assert "fedavg_lr" in listing.stdout and "sign" in listing.stdout


@pytest.mark.slow
def test_a_plugin_that_fails_to_import_stops_with_its_name(tmp_path):
    files = {"stamen_broken/__init__.py": "raise RuntimeError('half-installed dependency')\n",
             "pyproject.toml": ('[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = '
                                '"setuptools.build_meta"\n[project]\nname = "stamen-broken"\nversion = "0.1.0"\n'
                                '[project.entry-points."stamen.strategies"]\nbroken = "stamen_broken"\n')}
    site = _install(tmp_path, files, "broken")
    done = _python(site, "from stamen.strategies.registry import strategy_spec; strategy_spec('nope')")
    assert done.returncode != 0
    assert "plugin 'broken'" in done.stderr and "half-installed dependency" in done.stderr
