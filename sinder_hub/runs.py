"""A repair run folder that is never overwritten by accident and never looks finished when it is not.

- A folder that holds anything is refused unless the run resumes it (``--resume``) or is
  told to replace it (``--overwrite``, which removes only the files a run writes).
- ``.lock`` holds the owner's pid and host while a run is active; a second run into the
  same folder stops at once. A lock whose process is gone (same host) is stale and taken over.
- ``INCOMPLETE`` is written when a run starts and removed after its last file, the report,
  is in place. Every final file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

from .errors import RunFolderError
from .files import write_text_atomic

LOCK = ".lock"
INCOMPLETE = "INCOMPLETE"
REPORT = "repair_report.json"
CHECKPOINT = "checkpoint/state.pt"
# what a run writes; --overwrite removes these and nothing else
RUN_FILES = ("model.safetensors", "config.json", REPORT, INCOMPLETE)
RUN_PATTERNS = ("before_after_*.png", ".*.tmp-*")
RUN_FOLDERS = ("checkpoint",)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """The output folder of one repair run (see the module docstring)."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.created = False
        self.locked = False

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def check(self) -> None:
        """Read-only checks, before any model is loaded; raises ``RunFolderError``."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--output {path} is a file; expected a new or empty folder for the run")
        if self.resume and self.overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: resume a run or replace it")
        if self.resume:
            if not self.checkpoint.exists():
                raise RunFolderError(f"--resume: no checkpoint at {self.checkpoint} (start the run without --resume)")
            if (path / REPORT).exists() and not (path / INCOMPLETE).exists():
                raise RunFolderError(f"--resume: {path} holds a finished run ({REPORT}); nothing to resume")
            return
        contents = self._contents()
        if contents and not self.overwrite:
            kind = "a repair run" if (path / REPORT).exists() or (path / CHECKPOINT).exists() else "other files"
            raise RunFolderError(
                f"--output {path} already holds {kind} ({', '.join(contents[:3])}"
                f"{', ...' if len(contents) > 3 else ''}); pass --resume to continue a run, "
                f"--overwrite to replace it, or choose another folder"
            )

    def _contents(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def acquire(self) -> None:
        """Create the folder if needed, take the lock, clear a replaced run, mark the run incomplete."""
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"--output {self.path}: cannot create the folder ({error.strerror})") from error
        self._lock()
        try:
            self.check()  # again, now that the folder is ours: another run may have written in between
            if self.overwrite:
                self._remove_run_files()
            write_text_atomic(
                self.path / INCOMPLETE,
                "a repair run started here and has not finished; "
                "continue it with --resume or replace it with --overwrite\n",
            )
        except BaseException:
            self.release(failed=True)
            raise

    def _lock(self) -> None:
        lock = self.path / LOCK
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock.read_text(errors="replace").split() if lock.exists() else []
                pid = int(owner[0]) if owner and owner[0].isdigit() else None
                host = owner[1] if len(owner) > 1 else None
                if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
                    lock.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                holder = f"process {pid} on {host}" if pid is not None else "another process"
                raise RunFolderError(
                    f"--output {self.path} is locked by {holder} (a run is active there); if none is, remove {lock}"
                ) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            self.locked = True
            return
        raise RunFolderError(f"--output {self.path}: could not take the lock {lock}")

    def _remove_run_files(self) -> None:
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for pattern in RUN_PATTERNS:
            for path in self.path.glob(pattern):
                if path.is_dir():  # a model staging folder left by a kill
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def finished(self) -> None:
        """The report is in place: the run is complete."""
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def release(self, failed: bool = False) -> None:
        """Drop the lock; a folder this run created and left without a checkpoint is removed again."""
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False
        if failed and not self.checkpoint.exists():  # nothing was computed: leave no trace
            (self.path / INCOMPLETE).unlink(missing_ok=True)
            if self.created:
                with contextlib.suppress(OSError):  # something else is in it now: leave it
                    self.path.rmdir()
