"""The `internvl-fm` command.

Sub-commands are registered as entry points of the group `internvl_fm.commands` (pyproject.toml): each names a
function that takes argv (list[str]) and returns an exit code, and whose docstring's first line is its help. The
core names no task package; a task package (or a third-party one) adds commands by declaring entry points.
"""
from __future__ import annotations

import importlib.metadata
import sys
import warnings
from collections.abc import Callable

from internvl_fm.errors import InternVLError

COMMAND_GROUP = "internvl_fm.commands"


def commands() -> dict[str, importlib.metadata.EntryPoint]:
    """The registered sub-commands, by name (sorted)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=COMMAND_GROUP)}
    return dict(sorted(found.items()))


def _summary(func: Callable) -> str:
    return ((func.__doc__ or "").strip().splitlines() or [""])[0]


def _usage() -> str:
    registered = commands()
    width = max(map(len, registered), default=0)
    lines = ["usage: internvl-fm [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {_summary(ep.load())}" for name, ep in registered.items()]
    lines += ["", "Run `internvl-fm COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def info_main(argv: list[str]) -> int:
    """Describe a checkpoint folder or hub id (architecture, model type, parameter count)."""
    import json

    from internvl_fm.cli_utils import new_parser
    from internvl_fm.loading import count_checkpoint_parameters, read_config

    parser = new_parser("internvl-fm info", info_main.__doc__)
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
    registered = commands()
    if name not in registered:
        print(f"internvl-fm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    warnings.formatwarning = _one_line_warning
    try:
        return int(registered[name].load()(rest) or 0)
    except InternVLError as err:
        print(f"internvl-fm {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"internvl-fm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
