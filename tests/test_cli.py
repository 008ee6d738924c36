import subprocess
import sys

import pytest

from imgsearch import cli

CONTRACT_COMMANDS = ["demo", "embed", "build", "search", "serve", "dedup", "rebuild", "verify", "train"]


def test_every_contract_command_has_a_parser_and_a_handler_slot():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(CONTRACT_COMMANDS)
    assert sorted(cli.HANDLERS) == sorted(CONTRACT_COMMANDS)


@pytest.mark.parametrize("command", CONTRACT_COMMANDS)
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: imgsearch " + command in capsys.readouterr().out


def test_bad_arguments_exit_2_with_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["build", "--vectors", "x.npy", "--index-root", "r", "--shards", "zero"])
    assert exc.value.code == 2
    assert "expected a positive integer, got 'zero'" in capsys.readouterr().err


def test_unlanded_commands_exit_1_saying_not_implemented(capsys):
    unlanded = [name for name, target in cli.HANDLERS.items() if target is None]
    for name in unlanded:
        argv = {
            "embed": ["embed", "c.csv", "--store", "s"],
            "build": ["build", "--vectors", "x.npy", "--index-root", "r"],
            "search": ["search", "--index-root", "r", "--vectors", "q.npy"],
            "serve": ["serve", "--index-root", "r", "--store", "s"],
            "dedup": ["dedup", "--store", "s", "--index-root", "r", "--output", "g.jsonl"],
            "rebuild": ["rebuild", "c.csv", "--store", "s", "--index-root", "r"],
            "train": ["train", "c.csv", "--output", "m.pt"],
        }[name]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"imgsearch {name}: error: not implemented yet"]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "imgsearch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: imgsearch" in out.stdout
