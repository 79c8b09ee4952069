"""The command line in the test process, the arguments of the run tests' small repairs, the one-line error
every command ends a user error with, and what the run tests compare folders and interrupt runs with."""

from pathlib import Path

from sinder_hub.cli import main as cli_main


def cli(argv: list[str]) -> int:
    """``sinder-hub ARGV`` in this process: its exit code (argparse's errors exit through ``SystemExit``)."""
    try:
        return cli_main(argv)
    except SystemExit as exit:
        return exit.code


def repair_args(data, output, *extra):
    """``sinder-hub repair`` arguments of a small run: planted-swiglu at 224 px, a 3-block window, the
    expected directions, one held-out image, no loader processes, no progress bar; then ``extra``."""
    return [
        "repair",
        "--model",
        "planted-swiglu",
        "--data",
        str(data),
        "--output",
        str(output),
        "--resolution",
        "224",
        "--limit-layers",
        "3",
        "--directions-method",
        "expected",
        "--held-out",
        "astronaut",
        "--num-workers",
        "0",
        "--quiet",
        *extra,
    ]


def error_line(capsys) -> str:
    """The command's stderr is exactly one ``error:`` line: that line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def one_error_line(capsys, code: int, expected_code: int, *names: str) -> str:
    """The command exited ``expected_code`` and its stderr is exactly one ``error:`` line naming every
    one of ``names``."""
    line = error_line(capsys)
    assert code == expected_code, line
    for name in names:
        assert str(name) in line, (name, line)
    return line


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: ``{relative path: bytes}``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Interrupted:
    """Stands in for the SIGINT/SIGTERM handler of ``repair(stop=...)``: a signal "arrives" during the first step."""

    received = "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
