"""The base install is self-sufficient: what `internvl-fm demo` imports comes from declared base dependencies.

A subprocess sees only the distributions in the dependency closure of `internvl-fm` without extras (a folder of links
to their files, `python -S`), then runs the demo: a module the base install needs but does not declare (protobuf for
the sentencepiece tokenizer conversion, once) is missing there, as it would be in a fresh venv.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from internvl_fm.cli import commands


def _closure(dist_name: str) -> set[str]:
    """Normalised names of `dist_name` and everything it requires without extras (markers evaluated here)."""
    seen: set[str] = set()
    todo = [dist_name]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_base_dependencies_are_declared():
    base = _closure("internvl-fm")
    for needed in ("torch", "transformers", "sentencepiece", "protobuf", "safetensors", "faiss-cpu", "pillow"):
        assert needed in base, f"{needed} is not in the base install of internvl-fm"


def _base_site(tmp_path) -> str:
    """A folder holding only the base install (links to the files of each distribution in the closure), so a
    subprocess started with `python -S` and this folder as its site sees what a fresh base-only venv would."""
    site = tmp_path / "site"
    site.mkdir()
    base = _closure("internvl-fm")
    for dist in metadata.distributions():
        if dist.metadata["Name"].lower().replace("_", "-") not in base or not dist.files:
            continue
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}:
            link = site / top
            if (root / top).exists() and not link.exists():
                link.symlink_to(root / top)
    return str(site)


def _run_base_only(tmp_path, code: str) -> subprocess.CompletedProcess:
    script = f"import site, sys\nsite.addsitedir({_base_site(tmp_path)!r})\n" + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)


def test_base_site_hides_other_packages(tmp_path):
    result = _run_base_only(tmp_path, "import torch, transformers, internvl_fm\nimport pytest\n")
    assert result.returncode != 0 and "No module named 'pytest'" in result.stderr


@pytest.mark.slow
def test_demo_runs_with_base_dependencies_only(tmp_path):
    result = _run_base_only(tmp_path, "from internvl_fm.cli import main\nsys.exit(main(['demo']))\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_every_command_module_imports_with_the_base_install(tmp_path):
    """Sub-command modules import only base dependencies at module level (optional extras are imported lazily)."""
    modules = sorted({ep.module for ep in commands().values()})
    result = _run_base_only(tmp_path, f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n")
    assert result.returncode == 0, result.stderr[-3000:]
