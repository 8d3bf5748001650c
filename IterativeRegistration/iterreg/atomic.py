"""Atomic writes: everything we save appears whole or not at all (temp name in the same folder, then rename)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_file", "default_file_mode", "default_dir_mode", "interrupted_writes"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(..., 'w')`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    return 0o777 & ~_umask()


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def interrupted_writes(path: str | os.PathLike) -> list[Path]:
    """Temporary files an :func:`atomic_file` write of ``path`` left behind because its process was killed
    (kill -9, power loss) before it could remove them; ``path`` itself is whole (the old or the new file)."""
    path = Path(path)
    suffix = "".join(path.suffixes)
    return sorted(p for p in path.parent.glob(f"{_temporary_prefix(path)}*{suffix}") if p.is_file())


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
