"""The `internvl-fm` entry point: help, unknown commands, and the `info` command on a real checkpoint layout."""
import json
import subprocess
import sys

from internvl_fm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_reports_architecture_and_parameters(tiny_clip_path):
    out = subprocess.run([sys.executable, "-m", "internvl_fm.cli", "info", str(tiny_clip_path)], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["architectures"] == ["InternVLModel"] and info["parameters"] > 100_000
