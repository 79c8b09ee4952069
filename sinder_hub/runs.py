"""A run folder that is never overwritten by accident and never looks finished when it is not.

- A folder that holds anything is refused unless the run resumes it (``--resume``) or is
  told to replace it (``--overwrite``). A run never writes into the folder or the file it
  reads its model or data from.
- ``.lock`` holds the owner's pid and host while a run is active; a second run into the
  same folder stops at once. A lock whose process is gone (same host) is stale and taken over.
- Nothing is removed before the new run has passed every check, its model loaded
  (``begin``); ``--overwrite`` then removes only the files a run writes, by name
  (``RunFiles``), and leaves everything else, a user's files inside ``checkpoint/`` included.
- ``INCOMPLETE`` is written when the run begins and removed after its last file, the report,
  is in place. Every final file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError, RunFolderError
from .files import output_error, write_text_atomic, writing

LOCK = ".lock"
INCOMPLETE = "INCOMPLETE"
REPORT = "repair_report.json"
CHECKPOINT = "checkpoint/state.pt"
# hidden temporary files and staging folders of our atomic writes (a kill can leave them behind)
TEMPORARY = ".*.tmp-*"


@dataclass(frozen=True)
class RunFiles:
    """What a kind of run writes: ``names`` and ``patterns`` at the top of its folder, and its checkpoint."""

    kind: str
    report: str
    names: tuple[str, ...]
    patterns: tuple[str, ...] = ()
    checkpoint: str | None = None

    def owns(self, name: str) -> bool:
        """Whether a top-level entry ``name`` is one this kind of run writes."""
        return name in self.names or any(fnmatch.fnmatchcase(name, p) for p in (*self.patterns, TEMPORARY))


REPAIR_FILES = RunFiles(
    kind="repair run",
    report=REPORT,
    names=("model.safetensors", "config.json", REPORT, INCOMPLETE),
    patterns=("before_after_*.png",),
    checkpoint=CHECKPOINT,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """The output folder of one run (see the module docstring)."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False, files: RunFiles = REPAIR_FILES):
        self.path = Path(path).expanduser()
        self.resume, self.overwrite, self.files = resume, overwrite, files
        self.created = False  # this run made the folder
        self.locked = False
        self.began = False  # this run passed its checks and marked the folder INCOMPLETE

    @property
    def checkpoint(self) -> Path:
        return self.path / (self.files.checkpoint or CHECKPOINT)

    def check(self) -> None:
        """Read-only checks, before any model is loaded; raises ``RunFolderError``."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--output {path} is a file; expected a new or empty folder for the run")
        if self.resume and self.overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: resume a run or replace it")
        if self.resume:
            if self.files.checkpoint is None:
                raise RunFolderError(f"--resume: a {self.files.kind} has no checkpoint to resume")
            if not self.checkpoint.exists():
                raise RunFolderError(f"--resume: no checkpoint at {self.checkpoint} (start the run without --resume)")
            if (path / self.files.report).exists() and not (path / INCOMPLETE).exists():
                raise RunFolderError(f"--resume: {path} holds a finished run ({self.files.report}); nothing to resume")
            return
        contents = self._contents()
        if contents and not self.overwrite:
            ours = (path / self.files.report).exists() or (path / INCOMPLETE).exists() or self._has_checkpoint()
            kind = f"a {self.files.kind}" if ours else "other files"
            hint = "pass --resume to continue a run, " if self.files.checkpoint and ours else ""
            listing = f"{', '.join(contents[:3])}{', ...' if len(contents) > 3 else ''}"
            raise RunFolderError(
                f"--output {path} already holds {kind} ({listing}); {hint}--overwrite to replace "
                f"{'it' if ours else 'the files a run writes there'}, or choose another folder"
            )

    def check_inputs(self, inputs: dict[str, str]) -> None:
        """``RunFolderError`` when the run would write where it reads: ``inputs`` maps a flag to a spec
        (``{"--model": ..., "--data": ...}``); one that is this folder, or lies inside it, is refused."""
        output = self.path.resolve()
        for flag, spec in inputs.items():
            source = Path(str(spec)).expanduser()
            if not spec or not source.exists():
                continue
            source = source.resolve()
            if source == output or output in source.parents:
                where = "is" if source == output else "contains"
                raise RunFolderError(
                    f"--output {self.path} {where} the {flag} {spec} that the run reads; "
                    f"write the run into another folder"
                )

    def _has_checkpoint(self) -> bool:
        return self.files.checkpoint is not None and self.checkpoint.exists()

    def _contents(self) -> list[str]:
        """Entries of the folder besides the lock and an empty ``checkpoint/`` a failed run may leave."""
        if not self.path.is_dir():
            return []
        empty_checkpoint = self.files.checkpoint is not None and _is_empty_dir(self.checkpoint.parent)
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.name != LOCK and not (empty_checkpoint and p == self.checkpoint.parent)
        )

    def acquire(self) -> None:
        """Create the folder if needed and take the lock; nothing in the folder is changed yet."""
        self.created = not self.path.exists()
        with writing(self.path, "create the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.check()  # again, now that the folder is ours: another run may have written in between
        except BaseException:
            self.release(failed=True)
            raise

    def begin(self) -> None:
        """Every check has passed: remove an earlier run's files (``--overwrite``) and mark the run incomplete."""
        if self.overwrite:
            self._remove_run_files()
        self.began = True
        advice = "continue it with --resume or " if self.files.checkpoint else "run it again to "  # no --resume
        write_text_atomic(
            self.path / INCOMPLETE,
            f"a {self.files.kind} started here and has not finished; {advice}replace it with --overwrite\n",
        )

    def _lock(self) -> None:
        lock_folder(self.path)
        self.locked = True

    def _remove_run_files(self) -> None:
        """Remove, by name, the files a run of this kind writes; nothing else."""
        with writing(self.path, "replace the earlier run in"):
            for entry in self.path.iterdir():
                if entry.name != LOCK and self.files.owns(entry.name):
                    _remove(entry)
            if self.files.checkpoint is not None:
                folder = self.checkpoint.parent
                self.checkpoint.unlink(missing_ok=True)
                for entry in folder.glob(TEMPORARY) if folder.is_dir() else ():
                    _remove(entry)
                with contextlib.suppress(OSError):  # a user's files inside it stay, and so does the folder
                    folder.rmdir()

    def finished(self) -> None:
        """The report is in place: the run is complete."""
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def release(self, failed: bool = False) -> None:
        """Drop the lock; a run that failed before its first checkpoint leaves no trace of itself."""
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False
        if failed and not self._has_checkpoint():
            with contextlib.suppress(OSError, OutputError):  # the run's own error is the one to report
                if self.began:  # only what this run wrote (begin() removed any earlier run's files); before, nothing
                    self._remove_run_files()
                if self.created:  # a folder this run created, if nothing else is in it now
                    self.path.rmdir()


def lock_folder(folder: Path, flag: str = "--output") -> None:
    """Create ``folder/.lock`` holding ``"<pid> <host>"``; ``RunFolderError`` naming ``flag`` when another live
    process holds it (a lock whose process is gone, same host, is stale and taken over)."""
    lock = folder / LOCK
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
                f"{flag} {folder} is locked by {holder} (a run is active there); if none is, remove {lock}"
            ) from None
        except OSError as error:
            raise output_error(lock, "take the lock", error) from error
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        return
    raise RunFolderError(f"{flag} {folder}: could not take the lock {lock}")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _remove(path: Path) -> None:
    """A file, or a staging folder of our own (a kill can leave one) with its files."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
