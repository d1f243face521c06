"""docs/chat.md runs as written: every offline ```python block on its own, and the offline shell lines."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "chat.md"
TEXT = DOC.read_text()
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
SHELL = [line for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S) for line in block.splitlines()
         if line.strip()]
MARKED = re.compile(r"^# requires: (network|gpu|dataset)\b")
OFFLINE_PYTHON = [b for b in PYTHON if not MARKED.match(b)]
OFFLINE_SHELL = [line for line in SHELL if not re.search(r"#\s*requires: (network|gpu|dataset)\s*$", line)]


def test_doc_has_offline_examples_and_no_outside_paths():
    assert len(OFFLINE_PYTHON) >= 5 and len(OFFLINE_SHELL) >= 2
    assert "../shared" not in TEXT and "INTERNVL_SPEC" not in TEXT and "DEPENDENCIES.md" not in TEXT
    # hub checkpoints only appear in marked blocks / lines
    assert not any("OpenGVLab/" in b for b in OFFLINE_PYTHON)
    assert not any("OpenGVLab/" in line for line in OFFLINE_SHELL)


@pytest.mark.parametrize("index", range(len(OFFLINE_PYTHON)))
def test_python_block_runs_on_its_own(index, tmp_path, monkeypatch, capsys):
    if "fastapi.testclient" in OFFLINE_PYTHON[index]:
        pytest.importorskip("httpx")
    monkeypatch.chdir(tmp_path)
    exec(compile(OFFLINE_PYTHON[index], f"docs/chat.md python block {index}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip()


def test_offline_shell_lines_run_in_order(tmp_path):
    """The lines of the offline bash block, one after the other in one folder, as a reader would type them."""
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    for line in OFFLINE_SHELL:
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
    assert proc.stdout.strip()  # the chat answer
