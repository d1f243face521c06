"""Architecture contracts (import-linter, configured in pyproject.toml): the core imports no task package and task
packages do not import each other. import-linter reads a normal package layout, so the project is installed
(without dependencies) into a temporary folder first: the editable install maps task packages from other folders."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"chat", "retrieval", "classification", "segmentation"}


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_under_the_core_contract():
    core = next(c for c in _contracts() if c["type"] == "forbidden")
    listed = {m.removeprefix("internvl_fm.") for m in core["source_modules"]}
    present = {p.stem for p in (ROOT / "internvl_fm").glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in (ROOT / "internvl_fm").iterdir() if (p / "__init__.py").is_file()}
    assert present - listed == set(), "core modules missing from the import-linter contract"
    assert {m.removeprefix("internvl_fm.") for m in core["forbidden_modules"]} == TASKS


@pytest.mark.slow
def test_import_contracts_hold(tmp_path):
    pytest.importorskip("importlinter")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert {p.name for p in (target / "internvl_fm").iterdir()} >= TASKS
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
