"""Writing a user's files safely: every final file goes to a temporary name in its folder and is renamed,
and a write that fails (disk full, read-only folder) ends in one line naming the file and the cause."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

ADVICE = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space (disk quota exceeded) and run again",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.EACCES: "no permission to write there; choose another output folder",
    errno.EPERM: "no permission to write there; choose another output folder",
}
# what the writers of other libraries say instead of raising OSError (safetensors, torch.save)
DISK_FULL_WORDS = ("No space left on device", "unexpected pos", "file write failed")


def _reason(error: BaseException) -> tuple[str, str]:
    """``(cause, advice)`` of a failed write."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or os.strerror(error.errno), ADVICE.get(error.errno, "check the output folder")
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(word in text for word in DISK_FULL_WORDS):
        return f"No space left on device ({text[:120]})", ADVICE[errno.ENOSPC]
    return text[:200], "check the output folder"


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed write: an ``OSError``, or a writer's own disk-full error."""
    if isinstance(error, OSError):
        return True
    return type(error).__name__ in ("SafetensorError", "RuntimeError") and any(
        word in str(error) for word in DISK_FULL_WORDS
    )


def output_error(path: str | Path, what: str, error: BaseException) -> OutputError:
    """``OutputError``: ``cannot <what> <path>: <cause>; <advice>``."""
    cause, advice = _reason(error)
    return OutputError(f"cannot {what} {path}: {cause}; {advice}")


@contextmanager
def writing(path: str | Path, what: str = "write") -> Iterator[None]:
    """Turn a failed write under this block into ``OutputError`` (see ``output_error``)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as error:
        if not is_write_failure(error):
            raise
        raise output_error(path, what, error) from error


def check_writable(folder: str | Path, flag: str) -> None:
    """Before any slow work: ``OutputError`` naming ``flag`` and the cause (read-only file system, no
    permission, disk full) unless ``folder`` can take files. An existing folder is proven with a probe
    file written and removed; a missing one is not created: its nearest existing parent must be writable."""
    folder = Path(folder)
    if folder.is_dir():
        probe = folder / f".sinder-hub-probe-{os.getpid()}"
        with writing(folder, f"write into {flag}"):
            probe.write_bytes(b"0")
            probe.unlink()
        return
    parent = next((p for p in folder.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(parent).f_flag & os.ST_RDONLY else errno.EACCES
        raise output_error(folder, f"write into {flag}", OSError(code, os.strerror(code)))


@contextmanager
def atomic_path(path: str | Path, what: str = "write") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed to ``path``.

    On an exception (or a kill) ``path`` keeps its previous content, or stays absent, and the
    temporary file is removed where possible (a kill can leave a ``.<stem>.tmp-<pid><suffix>``
    behind, never a truncated ``path``). The temporary name keeps the suffix, so writers
    that choose a format by extension (matplotlib, PIL) work on it. A failed write raises
    ``OutputError``: ``cannot <what> <path>: <cause>; <advice>``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with writing(path, what):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's contents (hex), read in 16 MiB blocks: the one file hash of the package."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
