"""Atomic, durable file writes: the one way mmm writes a file that a later run reads.

A file is written to a temporary name in its own folder, flushed to disk (fsync), renamed
over the target (atomic on POSIX filesystems) and the folder entry is flushed too. So a kill,
a power loss or a full disk leaves either the previous complete file or the new complete one,
never a partial one that loads; a failed write removes its temporary file and raises
`DiskFull` (an `OSError`) naming the file when the cause is a full disk, a quota or the
file-size limit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# No space, quota exceeded, file too large (RLIMIT_FSIZE): errors that freeing space fixes.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFull(OSError):
    """A write failed for lack of space; nothing was replaced and nothing partial was left."""


def space_error(path: Path, code: int) -> DiskFull:
    return DiskFull(
        code,
        f"could not write {path}: {os.strerror(code)} (disk full, quota or file-size limit). "
        f"The previous {path.name} (if any) is unchanged and no partial file was left: free space and run again",
    )


def space_errno(error: BaseException | None) -> int | None:
    """The errno of a space error, also when a library wrapped it (safetensors' Rust code and
    pyarrow raise their own types whose message or cause carries the OS error); else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _SPACE_ERRNOS:
            return error.errno
        for code in _SPACE_ERRNOS:
            if os.strerror(code) in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to write the file at a temporary path beside `path`, then make it
    durable and rename it into place (see the module doc). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if code := space_errno(e):
            raise space_error(path, code) from e
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def atomic_write_folder(folder: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary folder beside `folder`, make it durable and swap
    it in for `folder`. A failure removes the temporary folder and leaves `folder` as it was.
    The swap is two renames (a folder cannot replace a non-empty one atomically); killed
    between them, the previous folder is at `.<name>.old<pid>` beside it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run with the same pid
    try:
        tmp.mkdir()
        write(tmp)
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if code := space_errno(e):
            raise space_error(folder, code) from e
        raise
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    return folder
