"""The README as tried: what its commands name exists, and what it says of them holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL))
COMMANDS = [line.split("#")[0].strip() for line in BLOCKS.splitlines() if line.strip()]


def test_code_blocks_use_one_python_form():
    """After `source .venv/bin/activate` (said once), commands are plain `python ...`."""
    assert "source .venv/bin/activate" in BLOCKS
    assert not [c for c in COMMANDS if ".venv/bin/python" in c]


def test_scripts_and_make_targets_named_in_the_readme_exist():
    scripts = set(re.findall(r"python (?:-m torch\.distributed\.\w+ [^ ]+ (?:--use_env )?)?([\w/]+\.py)", README))
    assert {"main.py", "tools/model_zoo.py", "tools/make_synthetic_dataset.py"} <= scripts
    assert [s for s in scripts if not (REPO / s).is_file() and not (REPO / "rpe_ops" / s).is_file()] == []
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
    assert set(re.findall(r"`make ([\w-]+)", README)) <= targets


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--epochs", "--opt", "--momentum", "--device", "--aa", "--reprob", "--batch-size"):
        entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", text, flags=re.MULTILINE | re.DOTALL)
        assert entry and "(default:" in entry.group(0), flag


def test_pytest_selections_in_the_readme_select_tests():
    selections = [c for c in COMMANDS if c.startswith("python -m pytest") and " -k " in c]
    assert selections
    for command in selections:
        argv = command.split()[1:] + ["--collect-only", "-q"]
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert re.search(r"^(\d+)/\d+ tests collected", proc.stdout, flags=re.MULTILINE), proc.stdout[-500:]
        assert not re.search(r"^0/", proc.stdout, flags=re.MULTILINE)
