"""Every ``stamen …`` command in README.md's code blocks runs: run commands through the preflight
(``--dry-run``: the whole config and combination are checked, nothing starts), the others as
written, with a short attack and the report pointed at a study the test ran first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stamen.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(path: Path = ROOT / "README.md") -> list[str]:
    """The ``stamen …`` lines of the file's ```bash blocks (comments stripped, ``.venv/bin/`` dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip().removeprefix(".venv/bin/")
                if part.startswith("stamen"):
                    out.append(part)
    return out


def test_the_readme_has_the_commands_a_newcomer_needs():
    commands = readme_commands()
    kinds = {shlex.split(c)[1] for c in commands}
    assert {"run", "list", "sweep", "report", "attack"} <= kinds, kinds


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A tiny finished study for ``stamen report`` (the README reports the codecs study it ran)."""
    root = tmp_path_factory.mktemp("study")
    study = root / "tiny.toml"
    study.write_text(f'name = "tiny"\nbase = "{ROOT / "stamen/configs/default.toml"}"\nseeds = [0]\n'
                     '[fixed]\n"run.rounds" = 1\n"federation.clients" = 4\n"task.hidden" = 8\n'
                     '"task.local_epochs" = 1\n[grid]\n"compression.codec" = ["dense", "fp16"]\n')
    result = CliRunner().invoke(app, ["sweep", str(study), "--out", str(root / "out"), "--engine", "inprocess"])
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, study_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[1:]
    if args[0] == "run":
        args += ["--dry-run"]
    elif args[0] == "sweep":
        args += ["--dry-run"]
    elif args[0] == "report":
        args = ["report", str(study_dir), "--out", str(tmp_path / "report")]
    elif args[0] == "attack":
        args += ["--inputs", "1", "--iterations", "5", "--out", str(tmp_path / "attack.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{command}\n{result.output}"
