"""The command line in the test process, and the one-line error every command ends a user error with."""

from sinder_hub.cli import main as cli_main


def cli(argv: list[str]) -> int:
    """``sinder-hub ARGV`` in this process: its exit code (argparse's errors exit through ``SystemExit``)."""
    try:
        return cli_main(argv)
    except SystemExit as exit:
        return exit.code


def one_error_line(capsys, code: int, expected_code: int, *names: str) -> str:
    """The command's stderr is exactly one ``error:`` line naming every one of ``names``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]
