"""The `internvl-fm` entry point: help, unknown commands, and the `info` command on a real checkpoint layout."""
import json
import subprocess
import sys

from internvl_fm.cli import commands, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    registered = commands()
    assert {"demo", "info", "index", "search", "classify", "chat", "serve-chat", "seg-train"} <= set(registered)
    for name in registered:
        assert name in out


def test_unknown_command_fails_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_reports_architecture_and_parameters(tiny_clip_path):
    out = subprocess.run([sys.executable, "-m", "internvl_fm.cli", "info", str(tiny_clip_path)], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["architectures"] == ["InternVLModel"] and info["parameters"] > 100_000


def test_every_command_has_a_one_line_summary_and_help(capsys):
    for name, entry_point in commands().items():
        func = entry_point.load()
        assert callable(func) and (func.__doc__ or "").strip(), f"{name} has no docstring (its help line)"
