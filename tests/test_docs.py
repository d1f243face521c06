"""Every example in README.md and docs/*.md runs as written, and the docs only state what the repository holds.

What a doc example may assume (the conventions this test enforces):

- The reader ran the README's install command and works at the root of a clone of the repository, offline.
- Each ```python block runs on its own: a fresh namespace (its own imports), in a fresh empty working directory.
- Each ```bash block runs on its own as one bash script (`set -eo pipefail`), in a fresh empty working directory, so
  a block defines what it uses, e.g. `MODEL=$(python -c "import internvl_fm; print(internvl_fm.demo_model_path())")`,
  and makes its own sample files (a one-liner with `internvl_fm.training.data.render` or PIL).
- Repository files: a relative path in a block that names a file or folder of the clone (`segmentation/configs/
  shapes_demo.yaml`, `benchmarks/bench_index.py`, `tests/fixtures/...`, `pyproject.toml`) is copied into the working directory at the
  same relative path before the block runs, as if typed at the root of the clone. Nothing else of the repository is
  there: what a block generates (data/, work_dirs/, runs/) it must make itself. Files of the installed package are
  not copied (a partial `internvl_fm/` folder would shadow the package): reach them through the package, e.g.
  `internvl_fm.demo_model_path()`.
- Time: a bash block must finish within BLOCK_TIMEOUT_S (its whole process group is killed after that).
- Offline: `HF_HUB_OFFLINE=1`, an empty `HOME`. A block that needs the hub, a GPU or data the reader supplies starts
  with `# requires: network` (or `gpu`, `dataset`; several: `# requires: network, gpu`) and is skipped; in a bash
  block one command can be marked instead by a trailing `# requires: ...` comment (on the last line of a command
  continued with `\\`). Markers are checked: known words only, python markers on the first line only, and a
  `network` / `gpu` marker only where the code uses the hub / a GPU.
- Set-up commands are not re-run: `pip install ... && CMD` runs CMD only; `python -m pytest` lines are skipped (this
  test is part of that suite). The README's two set-up blocks are checked verbatim.
- Only ```python and ```bash fences are executed: a fence with another (or no) language that holds commands fails.

Some blocks also have their results checked (CHECKS below): the README quick start must rank the right caption
first through the model's logit scale, the tiny chat model must print text, the search and classify examples must
return the right images / labels.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REQUIREMENTS = ("network", "gpu", "dataset")
BLOCK_TIMEOUT_S = 420  # one bash block; the slowest offline example (segmentation quick start) takes ~1-3 min
# top-level folders whose files a block may name by relative path (copied into its working directory); not
# internvl_fm/: a partial copy would shadow the installed package (`import internvl_fm` from that directory)
COPIED_DIRS = ("benchmarks", "chat", "classification", "retrieval", "segmentation", "tests")
REPO_DIRS = (*COPIED_DIRS, "docs", "internvl_fm")
SETUP_BLOCKS = (
    'pip install -c constraints-ci.txt -e . && internvl-fm demo',
    'pip install -c constraints-ci.txt -e ".[dev]" && pip install --no-deps clip-retrieval==2.45.0 && python -m pytest tests -q',
)
# a `network` / `gpu` marker must sit on code that uses the hub / a GPU (so nothing offline hides behind a marker)
PLAUSIBLE = {"network": re.compile(r"OpenGVLab/|hf://|https?://|huggingface|hub|pip install|apt-get"),
             "gpu": re.compile(r"cuda|torchrun|nproc|device_map|load_in_8bit|gpu", re.I)}
FIRST_LINE_MARKER = re.compile(r"^#\s*requires:\s*(.*?)\s*$")
TRAILING_MARKER = re.compile(r"\s#\s*requires:\s*([^#]*?)\s*$")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
COMMAND_START = re.compile(r"^\s*(\$\s*)?(internvl-fm|python|torchrun|pip|cp|mkdir)\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # line of the opening fence
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [Block(path, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
            for m in FENCE.finditer(text)]


BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def parse_requirements(text: str, where: str) -> tuple[str, ...]:
    words = tuple(w for w in re.split(r"[,\s]+", text) if w)
    unknown = [w for w in words if w not in REQUIREMENTS]
    if not words or unknown:
        pytest.fail(f"{where}: marker '# requires: {text}' must name one or more of {', '.join(REQUIREMENTS)}")
    return words


def block_requirements(block: Block) -> tuple[str, ...]:
    """The block's first-line marker (empty when it has none)."""
    first = block.code.splitlines()[0] if block.code.strip() else ""
    m = FIRST_LINE_MARKER.match(first)
    return parse_requirements(m.group(1), block.name) if m else ()


def bash_commands(code: str) -> list[list[str]]:
    """Physical lines grouped into commands (a line ending with a backslash continues on the next one)."""
    commands: list[list[str]] = []
    current: list[str] = []
    for line in code.splitlines():
        current.append(line)
        if not line.rstrip().endswith("\\"):
            commands.append(current)
            current = []
    if current:
        commands.append(current)
    return commands


def runnable_script(block: Block) -> tuple[str, list[str]]:
    """The bash block minus marked commands, `pip install` clauses and test-suite runs; and the skip reasons."""
    kept: list[str] = []
    skipped: list[str] = []
    for lines in bash_commands(block.code):
        marker = TRAILING_MARKER.search(lines[-1])
        command = "\n".join(lines)
        if marker and not lines[-1].lstrip().startswith("#"):
            skipped.append(f"requires: {', '.join(parse_requirements(marker.group(1), block.name))}")
            continue
        previous = None
        while command != previous:  # every leading install clause
            previous, command = command, re.sub(r"^(\s*)(python -m )?pip install [^&;|]*(&&\s*|$)", r"\1", command)
        if re.match(r"^\s*(python -m pytest|pytest)\b", command):
            skipped.append("runs the test suite (which includes this test)")
            continue
        kept.append(command)
    return "\n".join(kept), skipped


def copy_repository_paths(code: str, workdir: Path) -> None:
    """Copy the files / folders of the clone a block names into `workdir`, at the same relative path."""
    pattern = rf"(?<![\w./~-])((?:{'|'.join(COPIED_DIRS)})/[\w./-]*)"
    top_files = {p.name for p in ROOT.iterdir() if p.is_file() and not p.name.startswith(".")}  # pyproject.toml...
    named = set(re.findall(pattern, code)) | (set(re.findall(r"[\w.-]+", code)) & top_files)
    for rel in sorted(named):
        rel = rel.rstrip(".")
        src = ROOT / rel
        if not rel or ".." in Path(rel).parts or not src.exists():
            continue
        dst = workdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------------ result checks
@dataclass
class Result:
    stdout: str
    workdir: Path
    namespace: dict | None = None  # python blocks only


def check_quick_start(r: Result) -> None:
    probs = r.namespace["probs"]
    assert tuple(probs.shape) == (3, 3)
    assert probs.argmax(-1).tolist() == [0, 1, 2], f"wrong caption ranked first:\n{probs}"
    assert probs.diagonal().min().item() > 0.9, probs
    for caption in r.namespace["captions"]:
        assert caption in r.stdout


def check_zero_shot(r: Result) -> None:
    preds = ast.literal_eval(r.stdout.strip().splitlines()[0])  # [(label, probability), ...] of the blue square
    assert preds[0][0] == "blue" and preds[0][1] > 0.9, preds


def check_chat_smoke(r: Result) -> None:
    assert re.search(r"\w", r.stdout), f"the tiny chat model printed no text: {r.stdout!r}"


def _attributes(workdir: Path, folder: str) -> dict[str, dict]:
    lines = (workdir / folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {Path(rec["image"]).name: rec["attributes"] for rec in map(json.loads, lines)}


def check_search_python(r: Result) -> None:
    hits = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(hits) == 5, r.stdout
    wanted = {"shape": "triangle", "color": "red", "size": "large", "position": "right"}  # 右边有一个大红色三角形
    assert _attributes(r.workdir, "photos")[Path(hits[0][0]).name] == wanted, hits[0]


def check_search_cli(r: Result) -> None:
    hits = [line.split("\t") for line in r.stdout.strip().splitlines() if "\t" in line]
    assert len(hits) == 10, r.stdout  # two searches, --top-k 5 each
    attrs = _attributes(r.workdir, "photos")
    assert attrs[Path(hits[0][0]).name] == {"shape": "star", "color": "blue", "size": "small", "position": "top"}
    assert Path(hits[5][0]).name == "000000.png"  # the query image itself comes first
    assert (r.workdir / "results.html").is_file()


def check_classify_cli(r: Result) -> None:
    lines = r.stdout.splitlines()
    for image, label in (("colors/red/large_circle.png", "red"), ("colors/blue/small_star.png", "blue")):
        assert image in lines, r.stdout
        top = lines[lines.index(image) + 1].split()
        assert top[1] == label and float(top[0]) > 0.9, (image, top)
    assert json.loads((r.workdir / "result.json").read_text())["metrics"]["acc1"] >= 0.9


def check_training_cli(r: Result) -> None:
    assert (r.workdir / "runs" / "ft" / "model.safetensors").is_file()


def check_version(r: Result) -> None:
    import internvl_fm

    assert f"internvl-fm {internvl_fm.__version__}" in r.stdout


def check_demo(r: Result) -> None:
    mean = re.search(r"^mean\s+([\d.]+)\s+([\d.]+)$", r.stdout, flags=re.M)
    assert mean and float(mean.group(2)) >= 0.9, r.stdout[-2000:]  # recall@5 over the five languages


# (file, a snippet that identifies the block) -> check of what the block printed / left behind
CHECKS: dict[tuple[str, str], Callable[[Result], None]] = {
    ("README.md", "model.logit_scale.exp() * img @ txt.T"): check_quick_start,
    ("README.md", "ZeroShotClassifier.from_classnames"): check_zero_shot,
    ("README.md", "tiny_chat_model("): check_chat_smoke,
    ("README.md", "ImageIndex.build("): check_search_python,
    ("README.md", "internvl-fm search photos_index"): check_search_cli,
    ("README.md", "internvl-fm classify colors/"): check_classify_cli,
    ("README.md", "internvl-fm train-clip pairs/"): check_training_cli,
    ("README.md", "internvl-fm --version"): check_version,
    ("README.md", SETUP_BLOCKS[0]): check_demo,
}


def checks_for(block: Block) -> list[Callable[[Result], None]]:
    rel = str(block.path.relative_to(ROOT))
    return [check for (file, snippet), check in CHECKS.items() if file == rel and snippet in block.code]


# ------------------------------------------------------------------------------------------ running the blocks
@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """An empty HOME and the hub switched off, for the block and anything it starts."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - transformers always brings it
        pass
    else:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs_on_its_own(block, offline_home, monkeypatch, capsys):
    needs = block_requirements(block)
    if needs:
        pytest.skip(f"requires: {', '.join(needs)}")
    copy_repository_paths(block.code, offline_home)
    monkeypatch.chdir(offline_home)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(block.code, block.name, "exec"), namespace)
    result = Result(capsys.readouterr().out, offline_home, namespace)
    for check in checks_for(block):
        check(result)


@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_bash_block_runs_on_its_own(block, offline_home):
    needs = block_requirements(block)
    if needs:
        pytest.skip(f"requires: {', '.join(needs)}")
    script, skipped = runnable_script(block)
    if not script.strip() or all(line.lstrip().startswith("#") or not line.strip() for line in script.splitlines()):
        pytest.skip("; ".join(sorted(set(skipped))) or "no command")
    copy_repository_paths(script, offline_home)
    script_file = offline_home.parent / "block.sh"
    script_file.write_text("set -eo pipefail\n" + script + "\n", encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(["bash", str(script_file)], cwd=offline_home, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the block's whole process group, not only bash
        proc.communicate()
        pytest.fail(f"{block.name} ran longer than {BLOCK_TIMEOUT_S} s: make the example smaller, or mark a command "
                    f"that cannot run in a test with '# requires: ...'")
    assert proc.returncode == 0, (f"{block.name} failed (exit {proc.returncode}):\n{script}\n--- stdout\n"
                                  f"{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    result = Result(stdout, offline_home)
    for check in checks_for(block):
        check(result)


# ------------------------------------------------------------------------------------------ static checks
def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = read_blocks(ROOT / "README.md")[:2]
    assert [(b.lang, b.code.strip()) for b in first] == [("bash", cmd) for cmd in SETUP_BLOCKS]
    before = text[: text.index("```")].strip()
    assert before.startswith("# ") and "\n" not in before, "only the title may come before the set-up commands"


def test_every_check_finds_its_block():
    for (file, snippet), check in CHECKS.items():
        found = [b.name for b in BLOCKS if str(b.path.relative_to(ROOT)) == file and snippet in b.code]
        assert len(found) == 1, f"{check.__name__}: {snippet!r} is in {len(found)} blocks of {file}: {found}"


def test_markers_are_well_formed_and_plausible():
    problems = []
    for block in PYTHON + BASH:
        lines = block.code.splitlines()
        needs = block_requirements(block)
        if block.lang == "python":
            problems += [f"{block.name}: '# requires:' must be the first line of the block"
                         for line in lines[1:] if re.match(r"\s*#\s*requires:", line)]
            marked = [(needs, block.code)] if needs else []
        else:
            marked = [(needs, block.code)] if needs else []
            for command in bash_commands(block.code):
                m = TRAILING_MARKER.search(command[-1])
                if m and not command[-1].lstrip().startswith("#"):
                    marked.append((parse_requirements(m.group(1), block.name), "\n".join(command)))
            problems += [f"{block.name}: a marker cannot sit on a line continued with '\\': {line.strip()}"
                         for command in bash_commands(block.code) for line in command[:-1] if "# requires:" in line]
            problems += [f"{block.name}: a '# requires:' comment line only counts as the first line of the block"
                         for line in lines[1:] if re.match(r"\s*#\s*requires:", line)]
        for words, code in marked:
            for word in words:
                if word in PLAUSIBLE and not PLAUSIBLE[word].search(re.sub(r"#\s*requires:.*", "", code)):
                    problems.append(f"{block.name}: marked '{word}' but uses no {word} resource:\n{code}")
    assert not problems, "\n".join(problems)


def fully_skipped(block: Block) -> bool:
    return bool(block_requirements(block)) or (block.lang == "bash" and not runnable_script(block)[0].strip())


def test_most_examples_run():
    """Markers are for what truly cannot run here: in the README only the real-checkpoint chat example, the 8-GPU
    ADE20K command and the test-suite command are skipped; in all docs at least two thirds of the blocks run."""
    allowed = ("OpenGVLab/InternVL2-2B", "torchrun --nproc_per_node 8", "python -m pytest tests -q")
    readme = [b for b in PYTHON + BASH if b.path.name == "README.md" and fully_skipped(b)]
    assert all(sum(s in b.code for s in allowed) == 1 for b in readme), [b.name for b in readme]
    assert len(readme) <= len(allowed), [b.name for b in readme]
    skipped = [b.name for b in PYTHON + BASH if fully_skipped(b)]
    assert len(skipped) <= len(PYTHON + BASH) // 3, skipped


def test_only_python_and_bash_fences_hold_code():
    """Commands in a fence this test does not run (```sh, ```console, or none) would never be checked."""
    wrong = [b.name for b in BLOCKS if b.lang not in ("python", "bash")
             and any(COMMAND_START.match(line) for line in b.code.splitlines())]
    assert not wrong, f"use ```bash for commands: {wrong}"
    wrong_python = [b.name for b in BLOCKS if b.lang in ("py", "python3", "pycon")]
    assert not wrong_python, f"use ```python: {wrong_python}"


def test_docs_reference_only_files_in_the_repository():
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        problems += [f"{rel}: points outside the repository: {m}" for m in re.findall(r"(?<![\w.])\.\./[\w./-]+", text)]
        for name in sorted(set(re.findall(r"(?<![\w/.-])([\w./-]*[A-Za-z_]\.md)\b", text))):
            if not ((ROOT / name).is_file() or (path.parent / name).is_file() or (ROOT / "docs" / name).is_file()):
                problems.append(f"{rel}: names {name}, which is not in the repository")
        for name, pattern in sorted(set(re.findall(rf"(?<![\w./~-])((?:{'|'.join(REPO_DIRS)})/[\w./-]+)([*{{]?)",
                                                   text))):
            name = name.rstrip(".")
            exists = any(ROOT.glob(name + "*")) if pattern else (ROOT / name).exists()  # `tests/test_chat_*.py`
            if not exists:
                problems.append(f"{rel}: names {name}{pattern}, which is not in the repository")
    assert not problems, "\n".join(problems)


def test_speed_ratios_next_to_a_benchmark_script_are_the_measured_ones():
    """A ratio quoted in a paragraph that names a benchmarks/ script must be one of docs/benchmarks.md's."""
    ratio = r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?x\b"
    measured_text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    measured = {n for pair in re.findall(ratio, measured_text) for n in pair if n}
    problems = []
    for path in DOC_FILES:
        if path.name == "benchmarks.md":
            continue
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            for line in paragraph.splitlines() if paragraph.lstrip().startswith("|") else [paragraph]:
                if "bench_" not in line:
                    continue
                quoted = {n for pair in re.findall(ratio, line) for n in pair if n}
                problems += [f"{path.relative_to(ROOT)}: {n}x is not in docs/benchmarks.md: {line.strip()[:160]}"
                             for n in sorted(quoted - measured)]
    assert not problems, "\n".join(problems)


def resolves(dotted: str) -> bool:
    """`internvl_fm.a.b.c` names an importable module, an attribute of one, or an entry-point group."""
    import importlib
    import importlib.metadata

    if importlib.metadata.entry_points(group=dotted):  # `internvl_fm.commands`: the sub-commands
        return True
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_dotted_names_in_the_docs_exist():
    """Every `internvl_fm.x.y` the docs name (in prose, tables or code) is a module or attribute of the package."""
    problems = []
    for path in DOC_FILES:
        names = set(re.findall(r"\binternvl_fm(?:\.[A-Za-z_]\w*)+", path.read_text(encoding="utf-8")))
        problems += [f"{path.relative_to(ROOT)}: {name} does not exist" for name in sorted(names) if not resolves(name)]
    assert not problems, "\n".join(problems)
