"""The ``trident`` command's help, as a new user meets it: a clean command list, every
option of every command explained with its default, unknown commands named."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from trident import cli

pytestmark = pytest.mark.timeout(120)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(cli.PARSERS))
def test_every_option_has_help_that_states_its_default(command: str) -> None:
    parser = cli.build_parser(command)
    formatter = parser._get_formatter()
    missing_help, missing_default = [], []
    for action in _options(parser):
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing_help.append(name)
            continue
        if action.option_strings and not action.required:
            text = formatter._expand_help(action)
            if "default" not in text.lower():
                missing_default.append(f"{name}: {text!r}")
    assert not missing_help, f"trident {command}: options without help: {missing_help}"
    assert not missing_default, f"trident {command}: help without its default: {missing_default}"


@pytest.mark.parametrize("command", sorted(cli.PARSERS))
def test_each_command_help_is_its_parser(command: str, capsys) -> None:
    """``trident CMD --help`` prints the parser the test above checked."""
    argv = [*command.split(), "--help"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out == cli.build_parser(command).format_help()


def test_trident_help_lists_each_command_on_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trident.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == ""
    assert "::" not in r.stdout and "``" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].startswith("usage: trident COMMAND")
    for name in cli.SUMMARIES:
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        description = line.split(None, 1)[1]
        assert len(description) > 10 and len(line) <= 100


def test_no_command_prints_the_list_and_exits_2(capsys) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "commands" in err and "report" in err


def test_an_unknown_command_is_named_with_the_list(capsys) -> None:
    assert cli.main(["frobnicate", "--x"]) == 2
    cap = capsys.readouterr()
    assert "trident: unknown command 'frobnicate'" in cap.err
    assert all(name in cap.err for name in cli.COMMANDS)
    assert cap.out == ""


def test_bench_help_lists_the_benchmarks_one_line_each(capsys) -> None:
    assert cli.main(["bench", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in cli.BENCHMARKS:
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        assert len(line.split(None, 1)[1]) > 10
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "planner" in err
