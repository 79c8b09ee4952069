"""Run the command line in a forked copy of the test process: a second process for the tests whose
point is one (a kill -9, a signal, two runs racing for a folder, the ranks of a distributed run)
without a new interpreter's imports (torch, timm and torchvision: about 8 s of CPU per start on the
2-core machine)."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from sinder_hub.cli import main as cli_main


def fork_cli(argv: list[str], stdout: Path, stderr: Path, prepare: Callable[[], None] | None = None) -> int:
    """Start ``sinder_hub.cli.main(argv)`` in a forked child, its output to the files ``stdout`` and
    ``stderr``; ``prepare`` runs in the child first (e.g. to make it die mid-write). Returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        torch.set_num_threads(1)  # the parent's OpenMP threads do not survive a fork; one thread needs none
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's whole life
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if prepare is not None:
            prepare()
        code = cli_main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never the parent's pytest teardown


def wait_forked(pid: int, timeout: float = 300.0) -> int:
    """The child's exit code (``-signal`` when a signal ended it); kills it and fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked process {pid} still running after {timeout} s")


def wait_for_file(pid: int, path: Path, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists while the child runs; fails (with its exit code) if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"forked process {pid} ended ({os.waitstatus_to_exitcode(status)}) before {path} existed"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def run_ranks(
    argv: list[str], world_size: int, output: Path, timeout: float = 300.0
) -> tuple[list[int], list[str], list[str]]:
    """Run ``sinder_hub.cli.main(argv)`` as ranks 0 .. ``world_size - 1`` of one gloo process group on
    this CPU, each in a forked child with the environment ``accelerate launch`` gives its processes
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``, ``ACCELERATE_USE_CPU``) and accelerate's state
    of this process dropped; wait for all. Returns their exit codes, stdouts and stderrs (also left in
    ``output/rank{r}.out`` and ``.err``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def as_rank(rank: int) -> Callable[[], None]:
        def prepare() -> None:
            from accelerate.state import AcceleratorState

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
            os.environ.update(ACCELERATE_USE_CPU="1", ACCELERATE_MIXED_PRECISION="no")
            AcceleratorState._reset_state(reset_partial_state=True)

        return prepare

    output.mkdir(parents=True, exist_ok=True)
    logs = [(output / f"rank{rank}.out", output / f"rank{rank}.err") for rank in range(world_size)]
    pids = [fork_cli(argv, out, err, prepare=as_rank(rank)) for rank, (out, err) in enumerate(logs)]
    codes = [wait_forked(pid, timeout) for pid in pids]
    return codes, [out.read_text() for out, _ in logs], [err.read_text() for _, err in logs]
