"""Writing a user's files safely: every final file goes to a temporary name in its folder and is renamed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed to ``path``.

    On an exception (or a kill) ``path`` keeps its previous content, or stays absent, and the
    temporary file is removed where possible (a kill can leave a ``.<stem>.tmp-<pid><suffix>``
    behind, never a truncated ``path``). The temporary name keeps the suffix, so writers
    that choose a format by extension (matplotlib, PIL) work on it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
