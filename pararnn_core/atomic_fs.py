"""Atomic folder renames and durable writes, the building blocks of the checkpoint swap.

``exchange(a, b)`` swaps two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``,
macOS ``renamex_np(RENAME_SWAP)``), so a folder can be replaced by a new one
without an instant at which neither exists. ``rename_noreplace`` moves a folder
into place only if nothing is there (``RENAME_NOREPLACE`` / ``RENAME_EXCL``).
Both raise ``NotSupported`` where the platform or the file system lacks them;
the caller then falls back to a protocol of plain renames (pararnn_core.checkpoint).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_LINUX_RENAME_NOREPLACE, _LINUX_RENAME_EXCHANGE = 1, 2
_MACOS_RENAME_SWAP, _MACOS_RENAME_EXCL = 2, 4
#: errors meaning "this kernel / file system cannot do it", not "this rename failed"
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class NotSupported(OSError):
    """The atomic rename is not available here (platform, libc or file system)."""


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_LIBC = _libc()


def _rename_with_flags(src: Path, dst: Path, linux_flag: int, macos_flag: int):
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux") and _LIBC is not None and hasattr(_LIBC, "renameat2"):
        result = _LIBC.renameat2(_AT_FDCWD, src_b, _AT_FDCWD, dst_b, ctypes.c_uint(linux_flag))
    elif sys.platform == "darwin" and _LIBC is not None and hasattr(_LIBC, "renamex_np"):
        result = _LIBC.renamex_np(src_b, dst_b, ctypes.c_uint(macos_flag))
    else:
        raise NotSupported(errno.ENOSYS, "atomic rename flags are not available on this platform")
    if result != 0:
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            raise NotSupported(code, f"{os.strerror(code)} (atomic rename of {src} -> {dst})")
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a, b):
    """Swap the paths ``a`` and ``b`` (both must exist) atomically."""
    _rename_with_flags(Path(a), Path(b), _LINUX_RENAME_EXCHANGE, _MACOS_RENAME_SWAP)


def rename_noreplace(src, dst):
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (checked atomically where supported)."""
    src, dst = Path(src), Path(dst)
    try:
        _rename_with_flags(src, dst, _LINUX_RENAME_NOREPLACE, _MACOS_RENAME_EXCL)
    except NotSupported:
        # plain rename(2) would silently replace an empty folder: check first (a narrow window,
        # closed against other pararnn writers by the folder lock)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        os.rename(src, dst)


def fsync_path(path):
    """Flush a file's or folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsync every file of ``folder`` (not recursive: checkpoint folders are flat) and the folder itself."""
    folder = Path(folder)
    for entry in folder.iterdir():
        if entry.is_file():
            fsync_path(entry)
    fsync_path(folder)
