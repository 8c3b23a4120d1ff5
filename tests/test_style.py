"""The structure the design promises, checked where CI runs: ruff (lint, format), mypy, module sizes,
and `sh` imported by relay.remote alone."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SOURCES = ["relay", "dodo.py", "tests", "bench"]


def tool(name, *args):
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this environment (pip install -e '.[test]')")
    return subprocess.run([str(path), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format_are_clean():
    lint = tool("ruff", "check", *SOURCES)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = tool("ruff", "format", "--check", *SOURCES)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_is_clean():
    proc = tool("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_module_is_over_about_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "relay").glob("*.py")}
    assert max(sizes.values()) <= 420, sizes


def test_only_relay_remote_imports_sh():
    users = [
        p.name
        for p in (REPO / "relay").glob("*.py")
        if re.search(r"^\s*(import sh\b|from sh import)", p.read_text(), re.M)
    ]
    assert users == ["remote.py"]
