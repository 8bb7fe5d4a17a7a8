"""Replace an output folder so that it always holds a complete version, under an exclusive lock.

The protocol (docs in README "Checkpoints: crash-safe and locked"):

* ``FolderLock(out)`` takes an exclusive ``flock`` on the sibling file ``.<name>.lock``
  (released by the kernel when the process dies, even by SIGKILL; the file is deleted
  on release) and writes the holder (pid, host, tool, start time) into it, so a second
  writer is refused with a message naming the first. On acquiring it, leftovers of writers that died are
  recovered or removed (``recover``): every writer holds the lock, so any
  ``.<name>.tmp-PID`` / ``.new-PID`` / ``.old-PID`` found then is stale.
* ``staging(out, replace)`` yields a fresh sibling ``.<name>.tmp-PID``; the caller
  writes the new version there; on success it is fsynced and committed:
  - ``out`` absent: one rename (no-replace: a folder that appeared meanwhile is
    never overwritten unless ``replace``);
  - ``out`` present: one atomic exchange of the two folders (Linux
    ``RENAME_EXCHANGE``, macOS ``RENAME_SWAP``), then the old version (now at the
    staging name) is deleted. ``out`` is complete at every instant;
  - where the file system cannot exchange: ``tmp -> .new-PID`` (marks it complete),
    ``out -> .old-PID``, ``.new-PID -> out``, delete ``.old-PID``. Between the middle
    two renames ``out`` is missing; the next writer's ``recover`` puts ``.new-PID``
    (else ``.old-PID``) back at ``out``.
* ``PARARNN_CHECKPOINT_FAULT=<point>[@n]`` kills the process (SIGKILL) the n-th time
  (default first) the protocol reaches ``<point>`` (one of ``FAULT_POINTS``): the hook of
  the fault-injection tests.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from pararnn_core import atomic_fs

FAULT_ENV = "PARARNN_CHECKPOINT_FAULT"
#: every point of the save protocol where the fault hook can kill the process, in order
FAULT_POINTS = (
    "staging-created",  # empty staging folder
    "staging-partial",  # config.json written, weights not yet
    "staging-written",  # every file written, not yet fsynced
    "staging-synced",  # fsynced, not yet committed
    "placed",  # first version renamed into place (out did not exist)
    "swapped",  # exchanged with the old version, which is not yet deleted
    "marked-complete",  # (no exchange) staging renamed to .new-PID
    "old-moved-aside",  # (no exchange) out renamed to .old-PID: out is missing here
    "new-in-place",  # (no exchange) .new-PID renamed to out, .old-PID not yet deleted
    "cleaned",  # the commit is done
)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<pid>\d+)$")
_fault_counts: Counter = Counter()


class FolderBusy(ValueError):
    """Another process holds the lock of an output folder."""


def fault_point(name: str):
    """The fault-injection hook: SIGKILL this process when ``PARARNN_CHECKPOINT_FAULT`` names this point."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _fault_counts[name] += 1
    if _fault_counts[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def staging_path(out, pid: int | None = None) -> Path:
    """Where a writer with process id ``pid`` (default: this one) stages a new version of ``out``.
    Several processes writing one version (sharded checkpoints) agree on the pid of the one that
    commits; ``recover`` knows these names."""
    return _sibling(normalized(out), "tmp", pid)


def normalized(out) -> Path:
    """``out`` as an absolute path without ``.``/``..`` (so ``--out .`` has a real name and parent)."""
    return Path(os.path.abspath(out))


def lock_path(out) -> Path:
    out = normalized(out)
    return out.parent / f".{out.name}.lock"


def leftovers(out) -> list[Path]:
    """Staging and swap folders of ``out`` left by writers that were killed."""
    out = normalized(out)
    if not out.parent.is_dir():
        return []
    found = []
    for entry in out.parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == out.name:
            found.append(entry)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover(out) -> list[str]:
    """Put a complete version back at ``out`` if an interrupted swap left it missing, then delete
    the other leftovers. Call only while holding ``FolderLock(out)``; returns what was done."""
    out = normalized(out)
    found = leftovers(out)
    notes = []
    if found and not os.path.lexists(out):
        for kind in ("new", "old"):  # .new is a complete new version, .old the complete previous one
            candidates = [p for p in found if _LEFTOVER.match(p.name)["kind"] == kind]
            if candidates:
                candidates[-1].rename(out)
                atomic_fs.fsync_path(out.parent)
                found.remove(candidates[-1])
                notes.append(f"recovered {out} from {candidates[-1].name}, left by an interrupted save")
                break
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path.name}, left by an interrupted save")
    return notes


def missing_hint(out) -> str:
    """For "folder not found" errors: mention a complete version an interrupted save left next to it."""
    complete = [p.name for p in leftovers(out) if _LEFTOVER.match(p.name)["kind"] in ("new", "old")]
    if not complete:
        return ""
    return (f" (an interrupted save left {', '.join(complete)} next to it; the next writer of this folder, "
            f"e.g. pararnn-train --resume, puts it back)")


class FolderLock:
    """Exclusive lock on an output folder for this process (re-entrant), naming its holder when refused."""

    _held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth)

    def __init__(self, out, tool: str = "pararnn"):
        self.out = Path(out)
        self.tool = tool
        self.path = lock_path(self.out)

    def __enter__(self) -> FolderLock:
        if self.path in self._held:
            fd, depth = self._held[self.path]
            self._held[self.path] = (fd, depth + 1)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._acquire()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "tool": self.tool,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._held[self.path] = (fd, 1)
        try:
            for note in recover(self.out):
                print(f"note: {note}", file=sys.stderr)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _acquire(self) -> int:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._describe_holder(fd)
                os.close(fd)
                raise FolderBusy(
                    f"{self.out} is in use by {holder}; wait for it to finish or stop it "
                    f"(two writers would overwrite each other's checkpoints)"
                ) from None
            # the holder unlinks the file when it is done: a lock on an unlinked file is no lock, retry
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc):
        fd, depth = self._held[self.path]
        if depth > 1:
            self._held[self.path] = (fd, depth - 1)
            return
        del self._held[self.path]
        self.path.unlink(missing_ok=True)  # still locked: a writer that opened it meanwhile retries
        os.close(fd)

    @staticmethod
    def _describe_holder(fd) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"{info['tool']} (pid {info['pid']} on host {info['host']}, since {info['since']})"
        except (ValueError, KeyError, OSError):
            return "another process (its details are not recorded in the lock file yet)"


@contextmanager
def staging(out, replace: bool):
    """Yield an empty staging folder next to ``out``; commit it to ``out`` when the block succeeds,
    delete it when the block fails. Hold ``FolderLock(out)`` around it."""
    out = normalized(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fault_point("staging-created")
    try:
        yield tmp
        commit(tmp, out, replace)
    except BaseException:
        for path in (tmp, _sibling(out, "new")):
            shutil.rmtree(path, ignore_errors=True)
        raise


def commit(staged: Path, out: Path, replace: bool):
    """Move a complete staging folder (``staging_path(out, pid)``) to ``out`` (see the module docstring).
    ``staging`` calls it; multi-process writers call it from the one process that holds the lock."""
    staged, out = normalized(staged), normalized(out)
    atomic_fs.fsync_tree(staged)
    fault_point("staging-synced")
    if not os.path.lexists(out):
        try:
            atomic_fs.rename_noreplace(staged, out)
        except FileExistsError:
            pass  # created meanwhile: replaced below only if allowed
        else:
            atomic_fs.fsync_path(out.parent)
            fault_point("placed")
            fault_point("cleaned")
            return
    if not replace:
        raise FileExistsError(
            f"{out} was created by someone else while this one was being written; nothing was replaced "
            f"(pass --force / force=True to overwrite it)"
        )
    try:
        atomic_fs.exchange(staged, out)
    except atomic_fs.NotSupported:
        _replace_by_renames(staged, out)
    else:
        atomic_fs.fsync_path(out.parent)
        fault_point("swapped")
        shutil.rmtree(staged)  # the previous version, now at the staging name
    fault_point("cleaned")


def _replace_by_renames(staged: Path, out: Path):
    new, old = _sibling(out, "new"), _sibling(out, "old")
    os.rename(staged, new)
    atomic_fs.fsync_path(out.parent)
    fault_point("marked-complete")
    os.rename(out, old)
    atomic_fs.fsync_path(out.parent)
    fault_point("old-moved-aside")
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)  # put the previous version back before reporting the failure
        raise
    atomic_fs.fsync_path(out.parent)
    fault_point("new-in-place")
    shutil.rmtree(old, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
