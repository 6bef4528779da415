"""One run per workdir: `with workdir_lock(workdir): ...`.

The lock is the file `<workdir>/.lock`, created with O_CREAT | O_EXCL (atomic on local and NFS v3+
filesystems) and holding JSON {"host", "pid", "started"}. A second run on the same workdir fails
at once with a `WorkdirBusyError` naming the holder. A lock left by a run that died (same host,
its pid no longer alive) is taken over with a log line; a lock from another host is never taken
over automatically, since its process cannot be checked from here: the message says which file to
delete once that run is known to be gone. The lock is released (the file removed) on exit, also
when the body raises.

Multi-host runs: only process 0 takes the lock (`process_index == 0`); the other processes of the
same run share the workdir by design and skip it. Two multi-host runs on one workdir are still
caught, by their process 0s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time

import jax

from kd_jax.errors import WorkdirBusyError

log = logging.getLogger("kd_jax")

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user.
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held, with unknown holder.


def _create(path: str, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(workdir: str) -> str:
    """Takes `<workdir>/.lock` (creating the workdir); -> the lock path. Raises
    WorkdirBusyError when a live run holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    host = socket.gethostname()
    info = {"host": host, "pid": os.getpid(), "started": time.time()}
    for _ in range(3):  # a takeover race with another starting run retries a few times.
        if _create(path, info):
            return path
        holder = _read(path)
        if holder is None:  # released between our two calls.
            continue
        h_host, h_pid = holder.get("host"), holder.get("pid")
        if h_host == host and isinstance(h_pid, int) and not _pid_alive(h_pid):
            log.warning(
                "workdir %s: taking over the lock of run pid %d on %s, which is no longer alive",
                workdir,
                h_pid,
                h_host,
            )
            _remove_if_same(path, holder)
            continue
        started = holder.get("started")
        since = (
            time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float))
            else ""
        )
        raise WorkdirBusyError(
            f"Workdir {workdir} is in use by another run (host {h_host or '?'}, pid "
            f"{h_pid if h_pid is not None else '?'}{since}; lock file {path}). Wait for it, use "
            f"another --workdir, or, if that run is gone, delete {path}."
        )
    raise WorkdirBusyError(f"Could not take the lock {path}: other runs keep taking it.")


def _remove_if_same(path: str, holder: dict) -> None:
    # Remove a stale lock only if it still is the one we read (another run may have taken it
    # over in the meantime).
    if _read(path) == holder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def holder(workdir: str) -> dict | None:
    """The live run holding `<workdir>/.lock` ({"host", "pid", "started"}), or None when the
    lock is absent or left by a dead process on this host (a lock of another host counts as
    live: its process cannot be checked from here)."""
    info = _read(os.path.join(workdir, LOCK_NAME))
    if info is None:
        return None
    h_host, h_pid = info.get("host"), info.get("pid")
    if h_host == socket.gethostname() and isinstance(h_pid, int) and not _pid_alive(h_pid):
        return None
    return info


def release(path: str) -> None:
    """Removes the lock if this process holds it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


@contextlib.contextmanager
def workdir_lock(workdir: str, *, process_index: int | None = None):
    """Holds `<workdir>/.lock` for the body (process 0 only; see the module docstring)."""
    if process_index is None:
        process_index = jax.process_index()
    if process_index != 0:
        yield None
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
