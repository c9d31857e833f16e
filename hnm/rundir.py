"""The work directory of a run: usable or not (one line), and one writer at a time.

``RunLock`` holds ``workdir/hnm.lock`` with ``fcntl.flock`` for the life of the run and writes
its holder into it (PID, host, start time, command). The kernel drops a flock when its holder
dies, however it dies (SIGKILL included), so a dead run's lock is taken over safely by the next
run, which says whose lock it took; a live holder makes a second run fail at once with one line
naming it. The file is never deleted while in use (deleting a flocked file lets a third process
lock a fresh inode beside a live holder); on exit it is emptied and unlocked.

A multi-process job holds one lock: process 0's (the caller passes ``enabled=False`` on the
others). On NFS, ``flock`` is emulated with POSIX byte-range locks, which work across hosts.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

LOCK_NAME = "hnm.lock"


class WorkdirError(ValueError):
    """The work directory cannot be used (a file, not writable, ...)."""


class RunLockedError(WorkdirError):
    """Another live process holds the work directory."""


def check_workdir(workdir: str) -> None:
    """Fails in one line when ``workdir`` cannot hold a run; creates nothing."""
    if not workdir:
        raise WorkdirError("--workdir is empty")
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise WorkdirError(f"work directory {workdir!r} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise WorkdirError(f"work directory {workdir!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f"cannot create work directory {workdir!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"cannot create work directory {workdir!r}: {parent!r} is not "
                           "writable")


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _describe(info: dict) -> str:
    if not info:
        return "another process (starting up)"
    return f"PID {info.get('pid')} on host {info.get('host')} (since {info.get('start')})"


class RunLock:
    """``with RunLock(workdir):`` — exclusive use of ``workdir`` (created if needed).

    Attributes:
      previous: the holder record of a dead run whose lock this one took over, else None.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled
        self.path = os.path.join(workdir, LOCK_NAME)
        self.previous: dict | None = None
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"work directory {self.workdir!r} is in use by {_describe(info)}; wait "
                    "for that run, stop it, or use another --workdir") from None
            raise
        self.previous = _read(fd) or None  # non-empty: its holder died without releasing
        payload = json.dumps(holder_info()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a full disk must not hide the run's own error
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def took_over_message(self) -> str | None:
        if self.previous is None:
            return None
        return (f"took over the lock of {_describe(self.previous)}, which is no longer "
                "running")


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def remove_if_empty(workdir: str) -> None:
    """Removes ``workdir`` if it holds nothing but empty folders and an empty lock file (a run
    that failed before writing anything must not leave an empty work directory behind)."""
    if not os.path.isdir(workdir):
        return
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            if not (f == LOCK_NAME and root == workdir and os.path.getsize(p) == 0):
                return
    lock = os.path.join(workdir, LOCK_NAME)
    if os.path.exists(lock):
        os.remove(lock)
    for root, dirs, _ in os.walk(workdir, topdown=False):
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(workdir)
