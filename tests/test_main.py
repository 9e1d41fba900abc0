"""The ``rnndrop`` command: its subcommands, usage and errors (``rnndrop demo`` is gone)."""

from rnndrop.__main__ import main


def test_usage_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("rnndrop study", "rnndrop fit", "rnndrop export-tb"))
    assert "demo" not in out


def test_no_or_unknown_command_is_an_error(capsys):
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err
    assert main(["demo"]) == 2  # the demo's schemes were a copy of the presets: removed
    assert "unknown command 'demo'" in capsys.readouterr().err


def test_study_subcommand_dispatches(capsys):
    assert main(["study", "long-range", "--quick", "--list-cells"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 36
