"""Conventions shared by every `internvl-fm` sub-command: one parser style, one name per concept.

- `new_parser(prog, doc)`: an argparse parser that shows every default in `--help`.
- `add_model_options(parser)`: `--dtype` / `--device` (and `--model` when asked), the same choices everywhere.
- `resolve_device(name)`: "auto" (the default) is cuda when available, else cpu.
- `CLIError`: raise it (or any `InternVLError`) from a command: `internvl-fm` prints one line and exits 2.

Names used across commands: `--model`, `--output`, `--top-k`, `--dtype`, `--device`, `--batch-size`.
"""
from __future__ import annotations

import argparse

from internvl_fm.errors import InternVLError

DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")
DTYPE_HELP = ("weights dtype: auto keeps the stored one; on CPU use bfloat16 (float16 matmuls there are ~300x "
              "slower); float16 is for GPUs")
DEVICE_HELP = "torch device: auto = cuda when available, else cpu; or cpu, cuda, cuda:1, ..."


class CLIError(InternVLError):
    """A command-line problem the user can fix (bad option value, wrong folder...): printed as one line, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help (not the empty ones: None, False, required options) and keeps line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def new_parser(prog: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An argparse parser for `internvl-fm <command>` that shows the default of every option in --help."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, model: str | None = None,
                      dtype: str = "auto") -> None:
    """Add `--dtype` and `--device` (and `--model`, required, with help text `model`, when given)."""
    if model is not None:
        parser.add_argument("--model", required=True, help=model)
    parser.add_argument("--dtype", default=dtype, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def resolve_device(name: str | None) -> str:
    """`auto` / None -> "cuda" when a GPU is visible, else "cpu"; anything else is returned as given."""
    if name in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def dtype_or_none(dtype: str | None) -> str | None:
    """The `--dtype` value as `from_pretrained` takes it (`auto` -> None: keep the stored dtype)."""
    return None if dtype in (None, "auto") else dtype
