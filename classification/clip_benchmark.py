"""Let upstream CLIP_benchmark evaluate internvl-fm models, without forking it.

CLIP_benchmark needs a loader returning `(model, transform, tokenizer)` where `model.encode_image(pixels)` and
`model.encode_text(tokens)` give raw embeddings, `transform` maps one PIL image to a tensor and
`tokenizer(texts)` returns a LongTensor. `register_clip_benchmark()` adds `load_internvl_fm` to its model table:

    from internvl_fm.classification.clip_benchmark import register_clip_benchmark
    register_clip_benchmark()          # then: clip_benchmark eval --model_type internvl_fm
                                       #        --model InternVL-C --pretrained /path/to/InternVL-14B-224px ...

`internvl-fm eval clip-benchmark [CLIP_benchmark eval options]` runs CLIP_benchmark's own `eval` command (its
parser, dataset names, `--dataset_root` / `--output` templates, result JSON) with this loader registered, its
numpy-2 metric bug worked around (`numpy2_safe_accuracy`) and its input mistakes reported in one line before any
model loads (`check_clip_benchmark_args`).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import functools
import importlib
import inspect
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterator, Sequence
from itertools import product
from typing import Any

import torch
from torch import nn

from internvl_fm.cli_utils import DTYPE_CHOICES, DTYPE_HELP, CLIError, HelpFormatter, dtype_or_none
from internvl_fm.errors import InternVLError
from internvl_fm.evaluation import tokenize_prompts
from internvl_fm.quantization import add_quantization_option

from .errors import ClassificationError, MissingDependencyError
from .zeroshot import resolve_mode

MODEL_TYPE = "internvl_fm"
INSTALL_HINT = "pip install 'internvl-fm[eval]'"
# upstream's default output, "{dataset}_{pretrained}_{model}_{language}_{task}.json", puts a checkpoint folder or a
# hub id (both hold '/') into the file name: the JSON write fails after the whole evaluation. Ours leaves it out.
DEFAULT_OUTPUT = "{dataset}_{model}_{language}_{task}.json"
ROOT_FIELDS = ("dataset", "dataset_cleaned")  # what CLIP_benchmark's run() fills into --dataset_root
OUTPUT_FIELDS = ("dataset", "model", "pretrained", "pretrained_full_path", "task", "language")  # and into --output


class ClipBenchmarkModel(nn.Module):
    """`encode_image` / `encode_text` facade over an `InternVLModel` in a fixed mode (raw, unnormalised)."""

    def __init__(self, model: nn.Module, mode: str = "InternVL-C"):
        super().__init__()
        self.model = model
        self.mode = resolve_mode(mode)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(device=self.model.device, dtype=self.model.dtype), mode=self.mode)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids.to(self.model.text_projection.device))


class ClipBenchmarkTokenizer:
    """`texts -> LongTensor [N, max_length]` under the InternVL contract (official padding to max_length)."""

    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            raise ClassificationError("the checkpoint has no tokenizer files; CLIP_benchmark needs a tokenizer")
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        return tokenize_prompts(self.tokenizer, [texts] if isinstance(texts, str) else texts)


def load_internvl_fm(model_name: str = "InternVL-C", pretrained: str | os.PathLike = "OpenGVLab/InternVL-14B-224px",
                     cache_dir: str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None, quantization: str | None = None
                     ) -> tuple[ClipBenchmarkModel, Callable[[Any], torch.Tensor], ClipBenchmarkTokenizer]:
    """CLIP_benchmark loader: `model_name` picks the mode, `pretrained` is the checkpoint folder or hub id.

    `cache_dir` is accepted for signature compatibility (hub downloads use the Hugging Face cache); `dtype` and
    `quantization` go to `from_pretrained`. The image transform is the classification one (resize short side +
    center crop), as in the paper's evaluation.
    """
    from internvl_fm.models.modeling_internvl import InternVLModel
    from internvl_fm.processing import build_transform

    mode = resolve_mode(model_name)
    model = InternVLModel.from_pretrained(pretrained, dtype=dtype, device=device, quantization=quantization)
    transform = build_transform(model.image_size, "classification")
    return ClipBenchmarkModel(model, mode).eval(), transform, ClipBenchmarkTokenizer(model.tokenizer)


def _import(module: str) -> types.ModuleType:
    """Import a clip_benchmark module, or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"CLIP_benchmark evaluation needs the clip-benchmark package ({err}): "
                                     f"{INSTALL_HINT}") from None


def register_clip_benchmark(model_type: str = MODEL_TYPE, **loader_options: Any) -> None:
    """Add `load_internvl_fm` to `clip_benchmark.models.TYPE2FUNC` / `MODEL_TYPES` (in place, idempotent).

    `loader_options` (`dtype`, `quantization`) are bound into the registered loader; calling again without them
    registers the plain loader."""
    cb_models = _import("clip_benchmark.models")
    loader = functools.partial(load_internvl_fm, **loader_options) if loader_options else load_internvl_fm
    cb_models.TYPE2FUNC[model_type] = loader
    if model_type not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(model_type)  # the list object is shared with clip_benchmark.cli's choices


# ---------------------------------------------------------------------------------------------- numpy-2 fix


def _scalar_float(value: Any) -> float:
    """`float()` as numpy 1 applied it: a 1-element array gives its one value (numpy 2 converts only 0-d arrays)."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(()))
    return float(value)


def _fails_under_numpy2(accuracy: Callable) -> bool:
    try:
        accuracy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), topk=(1,))
    except TypeError:
        return True
    return False


@contextlib.contextmanager
def numpy2_safe_accuracy() -> Iterator[Callable]:
    """Within the block, CLIP_benchmark's `accuracy()` works under numpy 2; the original is back on exit.

    clip-benchmark 1.6.2's `accuracy` ends with `float(<1-element array>)`, which numpy 2 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), so every classification and linear-probe run fails at
    its metric step. Rather than fork the package or keep an edited copy of the function, this runs upstream's own
    function -- the same code object -- with one name rebound in its globals: `float` -> `_scalar_float`, which
    converts a 1-element array as numpy 1 did. No logic is copied, so the numbers are upstream's bit for bit. The
    swap is scoped: only the two module attributes that callers look up (`zeroshot_classification.accuracy` and
    `linear_probe.accuracy`, which imported the name), only for the duration of the block, and only when the
    installed release actually fails (a fixed release is used untouched). Yields the function in use.
    """
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    upstream = zeroshot_classification.accuracy
    if not _fails_under_numpy2(upstream):
        yield upstream
        return
    fixed = types.FunctionType(upstream.__code__, {**upstream.__globals__, "float": _scalar_float},
                               upstream.__name__, upstream.__defaults__, upstream.__closure__)
    fixed.__kwdefaults__ = upstream.__kwdefaults__
    functools.update_wrapper(fixed, upstream)
    patched = [module for module in (zeroshot_classification, linear_probe)
               if getattr(module, "accuracy", None) is upstream]
    for module in patched:
        module.accuracy = fixed
    try:
        yield fixed
    finally:
        for module in patched:
            module.accuracy = upstream


# ---------------------------------------------------------------------------------------------- the CLI


class _HelpFormatter(HelpFormatter):
    """Ours (defaults shown), except for flags: upstream's `--no_amp` / `--quiet` store False into a True default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help or "" if action.nargs == 0 else super()._get_help_string(action)


def clip_benchmark_parser(prog: str = "internvl-fm eval clip-benchmark") -> argparse.ArgumentParser:
    """CLIP_benchmark's own `eval` parser (its options, names, help and validation) with internvl-fm's defaults:
    `--model_type internvl_fm`, `--model InternVL-C`, `--pretrained` required, an `--output` template without
    `{pretrained}`; plus `--dtype` and `--quantization` for the internvl_fm loader."""
    register_clip_benchmark()  # --model_type's choices are CLIP_benchmark's MODEL_TYPES list
    cb_cli = _import("clip_benchmark.cli")
    argv = sys.argv
    sys.argv = [prog, "eval"]  # get_parser_args() builds the parser and parses sys.argv: a bare `eval` is valid
    try:
        top, _ = cb_cli.get_parser_args()
    finally:
        sys.argv = argv
    parser = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    parser.prog, parser.formatter_class = prog, _HelpFormatter
    parser.description = textwrap.fill("Run upstream CLIP_benchmark's `eval` with an internvl-fm model: its dataset names, "
                          "--dataset_root ({dataset}, {dataset_cleaned}) and --output templates, tasks and result "
                          "JSON. CLIP_benchmark picks the device itself (cuda when available, else cpu; set "
                          "CUDA_VISIBLE_DEVICES to choose) and uses autocast unless --no_amp.", 100)
    helps = {"model": "InternVL-C or InternVL-G (the image embedding used) for --model_type internvl_fm",
             "pretrained": "InternVL-C/G checkpoint folder or hub id (e.g. OpenGVLab/InternVL-14B-224px); required",
             "output": "result JSON; a template with {dataset}, {model}, {pretrained}, {pretrained_full_path}, "
                       "{task}, {language}"}
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
    parser.set_defaults(model_type=MODEL_TYPE, model=["InternVL-C"], pretrained=None, output=DEFAULT_OUTPUT)
    group = parser.add_argument_group("internvl-fm loader options (--model_type internvl_fm)")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    add_quantization_option(group)
    return parser


def _as_list(value: Any) -> list:
    return [] if not value else [value] if isinstance(value, str) else list(value)


@functools.lru_cache(maxsize=1)
def known_datasets() -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(names, name prefixes) that the installed CLIP_benchmark's `build_dataset` accepts, read from its source
    (`dataset_name == "cifar10"`, `dataset_name.startswith("wds/")`); None when its source cannot be read."""
    from clip_benchmark.datasets import builder

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(builder.build_dataset)))
    except (OSError, TypeError, SyntaxError):
        return None
    names: set[str] = set()
    prefixes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "dataset_name":
            for op, value in zip(node.ops, node.comparators):
                values = value.elts if isinstance(op, ast.In) and isinstance(value, ast.Tuple) else [value]
                if isinstance(op, (ast.Eq, ast.In)):
                    names.update(v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "dataset_name"):
            prefixes.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return (frozenset(names), tuple(sorted(prefixes))) if names else None


def _check_dataset_name(name: str) -> None:
    known = known_datasets()
    if known is None or name in known[0] or name.startswith(known[1]):
        return
    close = difflib.get_close_matches(name, sorted(known[0]), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CLIError(f"unknown CLIP_benchmark dataset {name!r}; {hint}a folder of your own in CLIP_benchmark's "
                   f"webdataset layout is --dataset wds/NAME (see `clip_benchmark_export_wds`)")


def _fill(template: str, option: str, fields: Sequence[str], **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        names = ", ".join("{" + f + "}" for f in fields)
        raise CLIError(f"{option} {template!r}: cannot fill it ({type(err).__name__}: {err}); CLIP_benchmark "
                       f"fills {names}") from None


def check_clip_benchmark_args(args: argparse.Namespace) -> None:
    """The mistakes CLIP_benchmark would report late (after the model loads) or as a traceback, as one-line
    CLIError: no --pretrained, an unknown mode or dataset name, a --dataset_root / --output template it cannot fill,
    a missing webdataset folder or output folder, linear_probe without CUDA, --task captioning for internvl_fm."""
    from clip_benchmark.datasets import builder

    ours = args.model_type == MODEL_TYPE
    pretrained_model = _as_list(args.pretrained_model)
    if not pretrained_model and not args.pretrained:
        raise CLIError("--pretrained is required: an InternVL-C/G checkpoint folder or hub id")
    if ours:
        for name in ([m.split(",")[0] for m in pretrained_model if "," in m] or _as_list(args.model)):
            try:
                resolve_mode(name)
            except ClassificationError:
                raise CLIError(f"--model {name!r}: with --model_type {MODEL_TYPE} use InternVL-C or InternVL-G "
                               "(the image embedding)") from None
        if args.task == "captioning":
            raise CLIError("--task captioning needs a generative model; internvl_fm models embed images and texts "
                           "(zeroshot_classification, zeroshot_retrieval, linear_probe, image_caption_selection)")
    elif args.dtype != "auto" or args.quantization not in (None, "none"):
        raise CLIError(f"--dtype and --quantization apply to --model_type {MODEL_TYPE} only")
    if args.task == "linear_probe" and not torch.cuda.is_available():
        raise CLIError("CLIP_benchmark's linear_probe runs on CUDA only (its linear_probe.evaluate asserts a cuda "
                       "device) and no GPU is visible; on CPU use `internvl-fm probe train|eval`")
    datasets: list[str] = []
    for name in _as_list(args.dataset):  # expanded as CLIP_benchmark's main_eval expands them
        if os.path.isfile(name):
            datasets += builder.get_dataset_collection_from_file(name)
        else:
            datasets += builder.dataset_collection.get(name, [name])
    models = [] if pretrained_model else list(product(_as_list(args.model), _as_list(args.pretrained)))
    splits = [args.split]
    if args.task == "linear_probe":
        splits += _as_list(args.train_split) + _as_list(args.val_split)
    for dataset in datasets:
        _check_dataset_name(dataset)
        name = dataset.replace("wds/", "", 1) if dataset.startswith("wds/") else dataset
        root = _fill(args.dataset_root, "--dataset_root", ROOT_FIELDS, dataset=name,
                     dataset_cleaned=name.replace("/", "-"))
        if dataset.startswith("wds/") and "://" not in root:
            for split in splits:
                shards = os.path.join(root, split, "nshards.txt")
                if not os.path.isfile(shards):
                    raise CLIError(f"dataset {dataset}: {shards} not found (--dataset_root {args.dataset_root!r}); a "
                                   "CLIP_benchmark webdataset folder holds SPLIT/nshards.txt and SPLIT/0.tar ...")
        task = args.task if args.task != "auto" else builder.get_dataset_default_task(name)
        for (model, pretrained), language in product(models, _as_list(args.language)):
            is_file = os.path.isfile(pretrained)
            output = _fill(args.output, "--output", OUTPUT_FIELDS, model=model, task=task, language=language,
                           dataset=name.replace("/", "_"),
                           pretrained=os.path.basename(pretrained) if is_file else pretrained,
                           pretrained_full_path=pretrained.replace("/", "_") if is_file else pretrained)
            folder = os.path.dirname(output) or "."
            if not os.path.isdir(folder):
                raise CLIError(f"--output {args.output!r} gives {output}, whose folder {folder} does not exist")


@contextlib.contextmanager
def _dataset_errors_in_one_line() -> Iterator[None]:
    """An error raised while CLIP_benchmark builds a dataset (a missing file, a bad split, a failed download), or
    any FileNotFoundError, is a data problem: ClassificationError naming the dataset and root, not a traceback."""
    from clip_benchmark.datasets import builder

    try:
        yield
    except InternVLError:
        raise
    except Exception as err:
        tb, frame = err.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code is builder.build_dataset.__code__:
                frame = tb.tb_frame
            tb = tb.tb_next
        if frame is None and not isinstance(err, FileNotFoundError):
            raise
        where = (f" dataset {frame.f_locals.get('dataset_name')!r} from {frame.f_locals.get('root')!r}"
                 if frame is not None else " the dataset")
        lines = str(err).strip().splitlines()  # a DataLoader worker's error ends with the original error's line
        message = lines[-1] if lines else ""
        if not message.startswith(f"{type(err).__name__}:"):
            message = f"{type(err).__name__}: {message}"
        raise ClassificationError(f"CLIP_benchmark could not read{where}: {message}") from err


def run_clip_benchmark(args: argparse.Namespace) -> None:
    """Check `args`, then run CLIP_benchmark's own `main_eval` with the internvl_fm loader (bound to `args.dtype` /
    `args.quantization`) and the numpy-2-safe `accuracy`; it writes one result JSON per run (`--output`)."""
    check_clip_benchmark_args(args)
    register_clip_benchmark(dtype=dtype_or_none(args.dtype), quantization=args.quantization)
    cb_cli = _import("clip_benchmark.cli")
    with numpy2_safe_accuracy(), _dataset_errors_in_one_line():
        cb_cli.main_eval(args)
