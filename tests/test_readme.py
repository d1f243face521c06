"""The README's offline Python examples run as written (blocks that use the bundled demo model or tiny models)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
OFFLINE = [b for b in BLOCKS if "demo_model_path" in b or "chat.testing" in b]


def test_readme_has_offline_examples():
    assert len(OFFLINE) >= 4


@pytest.mark.parametrize("index", range(len(OFFLINE)))
def test_readme_example_runs(index, capsys):
    namespace: dict = {}
    for block in OFFLINE[: index + 1]:  # later blocks may use names imported by earlier ones, as a reader would
        exec(compile(block, f"README block {index}", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # every example prints something
