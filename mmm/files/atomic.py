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
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dead(pid: int) -> bool:
    """Whether the writer with this pid is gone (so its leftovers are no one's work in
    progress); this process counts as gone: it is not mid-swap while it recovers."""
    return pid == os.getpid() or not pid_alive(pid)


def _leftovers(folder: Path) -> dict[int, dict[str, Path]]:
    """The temporary (`tmp`) and previous (`old`) folders that swaps of `folder` by processes
    now gone left beside it, by writer pid."""
    found: dict[int, dict[str, Path]] = {}
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)(\d+)")
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.parent.iterdir():
            if (m := pattern.fullmatch(entry.name)) and _dead(int(m[2])):
                found.setdefault(int(m[2]), {})[m[1]] = entry
    return found


def _mtime(path: Path) -> int:
    """When `path` was last written; -1 once another process recovering it has removed it."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_folder(folder: str | Path) -> Path | None:
    """Finish what a killed `atomic_write_folder` of `folder` left, and return what was put in
    place (None when nothing needed it). Killed between the swap's two renames, `folder` is
    missing, the previous one is at `.<name>.old<pid>` and the new one, complete (the swap only
    starts once it is written and flushed), at `.<name>.tmp<pid>`: the swap is finished; without
    the new one the previous one is put back. Other leftovers of dead writers (a temporary folder
    of a write killed before its swap, a previous folder not yet removed) are removed. Safe to
    call from several processes at once; the leftovers of a live writer are not touched."""
    folder = Path(folder)
    restored = None
    leftovers = _leftovers(folder)
    if not folder.exists():
        # Several interrupted swaps (kills in a row): the last one's previous folder is the newest.
        swaps = sorted((p for p in leftovers.values() if "old" in p), key=lambda p: _mtime(p["old"]))
        if swaps:
            swap = swaps[-1]
            source = swap.get("tmp", swap["old"])
            try:
                os.rename(source, folder)
                restored = source
            except OSError as e:  # another process recovered it first (the source is gone or the target is there)
                if not folder.exists():
                    raise OSError(e.errno, f"could not restore {folder} from {source}: {e.strerror}") from e
            else:
                fsync_path(folder.parent)
                what = (
                    "finished its swap"
                    if source.name.startswith(f".{folder.name}.tmp")
                    else "put the previous one back"
                )
                log.warning("%s was missing, its write having been killed mid-swap: %s (%s)", folder, what, source.name)
    for paths in leftovers.values():
        for path in paths.values():
            if path != restored:
                _remove(path)
    return folder if restored else None


def recover_folders(parent: str | Path) -> list[Path]:
    """`recover_folder` for every folder of `parent` that a killed swap left leftovers of (e.g.
    a run's `checkpoints/`, whose DeepSpeed checkpoints are folders); returns those put back."""
    names = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in Path(parent).iterdir():
            if m := re.fullmatch(r"\.(.+)\.(?:tmp|old)\d+", entry.name):
                names.add(m[1])
    return [p for name in sorted(names) if (p := recover_folder(Path(parent) / name)) is not None]


def atomic_write_folder(folder: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary folder beside `folder`, make it durable and swap
    it in for `folder`. A failure removes the temporary folder and leaves `folder` as it was.
    The swap is two renames (a folder cannot replace a non-empty one atomically); killed
    between them, `folder` is missing until `recover_folder` finishes the swap, which this
    function does first on its next call, as does resuming a run (`mmm.train.resume_path`)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)  # also removes leftovers of a killed run with this pid
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
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
