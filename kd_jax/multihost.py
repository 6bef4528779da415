"""What every process of a multi-host run must do the same way: read arrays, and decide.

Reading. `to_host` is the one way kd_jax brings arrays to the host. A fully addressable array
(one process, or every shard on this process's devices) is read directly; a replicated one is
read from this process's own replica; an array whose shards span processes is first gathered by
a jitted all-gather, so every process gets the same NumPy value. It is a collective: in a
multi-host run every process calls it on the same arrays (as SPMD code does).

Deciding. A choice a process makes from its own reads (a file exists, a shard is corrupt, the
newest readable checkpoint step) may differ between hosts: a file another host is still writing,
a local disk, a torn read. Acting on different choices deadlocks the next collective or trains
different states. `agree_ints`, `all_true` and `leader_value` turn one process's reads into one
decision every process acts on. With one process they return the local value unchanged, so the
single-host path has no extra cost.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("kd_jax")


def _spans_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(tree):
    """NumPy copies of a pytree of arrays, the same on every process (a collective when a leaf's
    shards span processes: one jitted all-gather for all such leaves together)."""
    leaves, treedef = jax.tree.flatten(tree)
    spans = [_spans_processes(x) for x in leaves]
    # One transfer for the addressable leaves; a replicated leaf that spans processes is read
    # from this process's replica; the rest are gathered together.
    out = jax.device_get([None if s else x for s, x in zip(spans, leaves)])
    gather = [i for i, x in enumerate(leaves) if spans[i] and not x.is_fully_replicated]
    for i, x in enumerate(leaves):
        if spans[i] and x.is_fully_replicated:
            out[i] = x.addressable_data(0)
    if gather:
        got = multihost_utils.process_allgather([leaves[i] for i in gather], tiled=True)
        for i, v in zip(gather, got):
            out[i] = v
    return jax.tree.unflatten(treedef, [np.asarray(v) for v in out])


def gather_ints(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """[processes, n]: every process's `values` (int64, the same length on each)."""
    local = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return local[None]
    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def all_true(flags: Sequence[bool] | np.ndarray, what: str = "") -> np.ndarray:
    """Element-wise AND of every process's `flags`: true only where every host found it so."""
    local = np.asarray(flags, bool).reshape(-1)
    every = gather_ints(local.astype(np.int64))
    agreed = every.min(axis=0).astype(bool)
    if what and (every.max(axis=0).astype(bool) != agreed).any():
        log.warning(
            "hosts disagree on %s (per process: %s); acting as if every host saw false",
            what,
            every.astype(bool).tolist(),
        )
    return agreed


def leader_value(value: int, what: str = "") -> int:
    """Process 0's `value` on every process (a warning names the hosts that saw another)."""
    every = gather_ints([value])[:, 0]
    if what and (every != every[0]).any():
        log.warning("hosts disagree on %s (per process: %s); using process 0's", what, every)
    return int(every[0])


def leader_ints(values: Sequence[int], what: str = "") -> list[int]:
    """Process 0's list of ints on every process (lists of any length; a warning names the
    hosts whose own list differs)."""
    values = [int(v) for v in values]
    if jax.process_count() == 1:
        return values
    lengths = gather_ints([len(values)])[:, 0]
    width = int(lengths.max())
    padded = np.full(width + 1, -1, np.int64)
    padded[0], padded[1 : len(values) + 1] = len(values), values
    every = gather_ints(padded)
    lead = [int(v) for v in every[0, 1 : int(every[0, 0]) + 1]]
    if what and (every != every[0]).any():
        log.warning("hosts disagree on %s (process 0: %s); using process 0's", what, lead)
    return lead


def sync(name: str) -> None:
    """A barrier: every process reaches it before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def stop_requested(stop) -> bool:
    """`stop.is_set()`, agreed: true on every process once any process's stop is set (a
    signal delivered to one host stops them all at the same step). A process that learns of
    another's request sets its own `stop` too (with that signal's number, for the exit status)."""
    if stop is None:
        return False
    if jax.process_count() == 1:
        return stop.is_set()
    every = gather_ints([int(stop.is_set()), int(getattr(stop, "signum", None) or 0)])
    asked = every[:, 0] > 0
    if asked.any() and not stop.is_set():
        signum = int(every[asked, 1][0])
        if signum and hasattr(stop, "request"):
            stop.request(signum)
        else:
            stop.set()
    return bool(asked.any())


DEBUG_SIGNAL = "KD_JAX_DEBUG_SIGNAL"  # "<stage>:<step>:<process>": a test's deterministic kill


def debug_signal(stage: str, step: int) -> None:
    """Tests: with $KD_JAX_DEBUG_SIGNAL = "<stage>:<step>:<process>", that process sends itself
    SIGTERM once `stage` finishes `step` (a real signal, at a step the test knows)."""
    spec = os.environ.get(DEBUG_SIGNAL)
    if spec and spec.rsplit(":", 2) == [stage, str(step), str(jax.process_index())]:
        os.kill(os.getpid(), signal.SIGTERM)
