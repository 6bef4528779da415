"""Host-memory allocation settings for CPU runs: glibc malloc tunables, applied by re-exec.

XLA:CPU allocates each step's buffers (temporaries, new params and optimizer state) with glibc
malloc. Blocks over the mmap threshold (32 MiB at most) come from fresh `mmap`s, and threads'
arenas give their free pages back, so every step touches new pages: the MiniLM CPU step of
benchmarks/minilm_step.py page-faults in hundreds of MB of fresh pages per step, which the
kernel zeroes. `TUNABLES` keep freed memory in the process instead: one arena (`arena_max=1`),
no mmap'd blocks (`mmap_max=0`), and no trimming of the heap's top (`trim_threshold` of 1 TiB).
From the second step on, a step reuses the pages of the one before: no faults, and a shorter
step.

The price: XLA's compiler, many threads allocating from one arena, is slower, and the process
keeps its peak heap until it exits (benchmarks/README.md, "Host memory", has the measured
faults, kernel time and ratios of both sides). So it is an opt-in for long CPU runs, where
steps outweigh compiles: `KD_JAX_HOST_MALLOC=tuned python -m kd_jax.main ...` (default
`system`: nothing changes).

glibc reads `GLIBC_TUNABLES` once, when the process starts, so `python -m kd_jax.main` (and
the CPU benchmarks) re-execute themselves with it before importing JAX, once. Nothing happens
when `GLIBC_TUNABLES` is already set (the user's own choice wins) or off glibc Linux. A notebook
kernel is already running: start Jupyter with `GLIBC_TUNABLES` set to `TUNABLES` instead.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from kd_jax.errors import ConfigValueError

TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
)
_SWITCH = "KD_JAX_HOST_MALLOC"  # "system" (default) or "tuned"
APPLIED = "KD_JAX_HOST_MALLOC_APPLIED"  # set by the re-exec (so it never loops)


def tuned_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should run as it is."""
    choice = environ.get(_SWITCH, "system")
    if choice not in ("tuned", "system"):
        raise ConfigValueError(
            f"{_SWITCH}={choice!r}; use 'system' (the default) or 'tuned' (or unset that "
            "environment variable)."
        )
    if choice == "system" or environ.get(APPLIED) or "GLIBC_TUNABLES" in environ:
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return {**environ, "GLIBC_TUNABLES": TUNABLES, APPLIED: "1"}


def reexec_tuned() -> None:
    """Replaces this process by the same command under `tuned_env` (same PID, argv and
    interpreter), or returns when there is nothing to change. Call it before importing JAX."""
    env = tuned_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # sys.orig_argv (Python >= 3.10): the interpreter's own options and `-m`/`-c` too
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # no exec here (a sandbox): run on with the system's settings
        return


def started_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` as it was before `reexec_tuned` added the tunables (for child processes that
    should run with the system's settings, e.g. a PyTorch baseline)."""
    env = dict(environ)
    if env.pop(APPLIED, None):
        env.pop("GLIBC_TUNABLES", None)
    return env


def describe(environ: Mapping[str, str]) -> str:
    """One line for logs: which malloc settings this process runs with."""
    if environ.get(APPLIED):
        return f"kd_jax tunables (GLIBC_TUNABLES={environ.get('GLIBC_TUNABLES')})"
    if "GLIBC_TUNABLES" in environ:
        return f"the user's GLIBC_TUNABLES={environ['GLIBC_TUNABLES']}"
    return "the system's"
