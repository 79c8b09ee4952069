"""The errors sinder-hub raises for things a user can fix, and the exit code each ends a command with.

Every message is one line that names the file, flag, layer or shape at fault and what was
expected. ``sinder_hub.cli`` prints ``error: <message>`` and exits with ``exit_code``:
2 for bad input (a flag, a file, a model spec), 1 for work that ran and failed.
"""

from __future__ import annotations


class SinderError(Exception):
    """Base of every user-facing error."""

    exit_code = 1


class InputError(SinderError, ValueError):
    """Bad input: a flag's value, a missing or unreadable file, a folder of the wrong kind."""

    exit_code = 2


class BackboneError(InputError):
    """A model spec that cannot be loaded as a supported backbone (name, file, folder, weights)."""


class DataError(InputError):
    """A data source (image folder, list file, dataset layout) that cannot be used."""


class RunFolderError(InputError):
    """A run or export folder that cannot be written: it holds another run, is locked, or is a file."""


class OutputError(SinderError):
    """An output that could not be written (disk full, read-only folder, no permission); exit code 1."""


class RepairError(SinderError):
    """A repair that ran but produced nothing usable (no update, every loss NaN, a degraded model)."""


def check_flags(config, checks) -> None:
    """Raise ``InputError`` for the first ``(flag name, ok, expected)`` of ``checks`` that is not ok:
    ``--flag VALUE: expected ...`` (``--flag is required: ...`` when the value is empty)."""
    for name, ok, expected in checks:
        if not ok:
            value = getattr(config, name)
            shown = " ".join(value) if isinstance(value, tuple) else str(value)
            given = f" {shown}:" if shown else " is required:"
            raise InputError(f"--{name.replace('_', '-')}{given} expected {expected}")
