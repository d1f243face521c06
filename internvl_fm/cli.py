"""The `internvl-fm` command. Each sub-command lives in its task package and is imported only when it runs."""
from __future__ import annotations

import importlib
import sys
import warnings

from internvl_fm.errors import InternVLError

# name -> (module, function, one-line help). The function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("internvl_fm.demo", "main", "offline demo: build an index with the bundled tiny model and query it"),
    "info": ("internvl_fm.cli", "info_main", "describe a checkpoint folder (architecture, sizes, parameter count)"),
    "train-clip": ("internvl_fm.training.cli", "main", "contrastive fine-tuning of InternVL-C on image-text pairs"),
    "index": ("internvl_fm.retrieval.cli", "index_main", "build / extend a search index (index build|add)"),
    "search": ("internvl_fm.retrieval.cli", "search_main", "query a search index by text or image"),
    "serve": ("internvl_fm.retrieval.cli", "serve_main", "serve a search index over HTTP with a web page"),
    "classify": ("internvl_fm.classification.cli", "classify_main", "zero-shot classify images against labels"),
    "eval": ("internvl_fm.classification.cli", "eval_main", "evaluate zero-shot classification on a dataset"),
    "probe": ("internvl_fm.classification.cli", "probe_main", "linear probe: probe train|eval"),
    "segment": ("internvl_fm.segmentation.cli", "segment_main", "segment an image (mask + overlay PNG)"),
    "seg-train": ("internvl_fm.segmentation.cli", "train_main", "train a segmentation head from a config file"),
    "seg-eval": ("internvl_fm.segmentation.cli", "eval_main", "evaluate a segmentation checkpoint (mIoU)"),
    "chat": ("internvl_fm.chat.cli", "chat_main", "chat with an InternVL-Chat model (one-shot or interactive)"),
    "serve-chat": ("internvl_fm.chat.cli", "serve_main", "OpenAI-compatible chat server"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: internvl-fm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `internvl-fm COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def info_main(argv: list[str]) -> int:
    """Print what a checkpoint folder holds."""
    import argparse
    import json

    from internvl_fm.loading import count_checkpoint_parameters, read_config

    parser = argparse.ArgumentParser(prog="internvl-fm info", description=info_main.__doc__)
    parser.add_argument("path", help="checkpoint folder or hub id")
    args = parser.parse_args(argv)
    cfg = read_config(args.path)
    print(json.dumps({"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
                      "parameters": count_checkpoint_parameters(args.path)}, indent=2))
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"internvl-fm: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Errors the user can fix (every `InternVLError`) print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from internvl_fm import __version__

        print(f"internvl-fm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"internvl-fm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    warnings.formatwarning = _one_line_warning
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except InternVLError as err:
        print(f"internvl-fm {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"internvl-fm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
