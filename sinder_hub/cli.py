"""The ``sinder-hub`` command: ``sinder-hub repair|registers|export|push|diagnose|evaluate|demo|view ...``.

Each sub-command lives in ``sinder_hub.commands.<name>`` as ``main(argv) -> int``; the
scripts in ``tools/`` call the same functions. Multi-process runs:
``accelerate launch -m sinder_hub.cli repair ...``. A ``SinderError`` ends the command
with one line on stderr and its exit code (2: bad input, 1: failed work, 130: interrupted).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "repair": "repair a backbone with SINDER (Algorithm 1) and write a run folder",
    "registers": "find test-time registers (the training-free rival) and write a registers folder",
    "export": "export a repaired backbone as stock timm and/or transformers folders",
    "push": "upload a run or export folder to the Hugging Face hub",
    "diagnose": "defect statistics and pictures of a backbone, beside up to three variants",
    "evaluate": "the paper's evaluations (k-NN, linear probes, segmentation, depth) of up to six variants",
    "demo": "the embedded demo: repair the planted-defect backbone on skimage's photos",
    "view": "open the browser viewer: up to six models' feature maps of your images, side by side",
}


INTERRUPTED = 130  # the exit code of a command stopped by SIGINT / SIGTERM (128 + SIGINT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``error: PROG: MESSAGE`` and exit code 2; ``prog`` is always
    ``sinder-hub <command>`` (a command may give its bare name), so every usage line reads alike."""

    def __init__(self, prog: str, **kwargs):
        super().__init__(prog=prog if prog.startswith("sinder-hub ") else f"sinder-hub {prog}", **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def run_command(name: str, argv: list[str]) -> int:
    """Run sub-command ``name`` with ``argv``; user errors become one line and an exit code."""
    from .errors import SinderError

    module = importlib.import_module(f"sinder_hub.commands.{name}")
    try:
        code = module.main(argv)
    except SinderError as error:
        _report(error)
        return error.exit_code
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:  # a path the user gave
        _report(error)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where a command sets no handler of its own: one line, as an interrupted repair
        _report(f"sinder-hub {name}: interrupted (Ctrl-C) before it finished")
        return INTERRUPTED
    return code if isinstance(code, int) else 0


def _report(error: BaseException | str) -> None:
    """One line on stderr; under ``accelerate launch`` only from the first process (all fail alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)


def usage() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return f"usage: sinder-hub {{{','.join(COMMANDS)}}} [options]\n       sinder-hub --version\n\n{commands}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"sinder-hub {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = "no command given" if not argv else f"unknown command {argv[0]!r}"
        print(f"error: sinder-hub: {problem}; expected one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
