"""The console script: top-level help, every subcommand's --help, unknown commands."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"cscctrl {command}" in capsys.readouterr().out


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_options_may_sit_between_positionals_and_items(capsys):
    """`cscctrl run demo --print-plan storage=/x`: the items after an option still reach the command."""
    assert main(["run", "demo", "--print-plan", "storage=/tmp/cscctrl-nowhere", "register.alias=staging"]) == 0
    plan = capsys.readouterr().out
    assert "storage: /tmp/cscctrl-nowhere" in plan and "alias: staging" in plan
