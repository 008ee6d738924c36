"""Every option of every subcommand has a help line, every subcommand's --help ends with an
example, and ``imgsearch --version`` prints the package version."""

import argparse
import subprocess
import sys
from importlib import metadata

import pytest

from imgsearch import cli


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_option_of_every_subcommand_has_help():
    parser, subparsers = _subparsers()
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in [("imgsearch", parser), *subparsers.items()] for a in sub._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("name", sorted(_subparsers()[1]))
def test_help_ends_with_an_example(name, capsys):
    sub = _subparsers()[1][name]
    assert sub.formatter_class is argparse.RawDescriptionHelpFormatter
    assert sub.epilog and sub.epilog.startswith("example") and f"imgsearch {name}" in sub.epilog
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].strip().startswith(f"imgsearch {name}")  # the example's own lines survive formatting


def test_version_exits_zero_with_the_package_version():
    out = subprocess.run([sys.executable, "-m", "imgsearch", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"imgsearch {metadata.version('imgsearch')}"
