"""Checkpoints through orbax's CheckpointManager (the only module that imports orbax).

A checkpoint holds four items: "state" (student + training-only params, optimizer state, step,
RNG), "data" (the input iterator's state, JSON), "meta" (teacher identity, stage, config, and
`finite`: whether every float array of the state was finite when saved) and "integrity" (JSON: a
checksum per state array). The teacher's weights are never in it. Orbax writes into a temporary
directory and renames it when complete, so a crash mid-save leaves the previous step as the latest
restorable one.

Integrity. Each array's checksum is two position-weighted sums of its bits modulo 2**32 (every
element's bits, widened to uint32, times an odd weight that depends on the element's flat index),
computed where the array lives: arrays in host memory (CPU devices, one process) by NumPy, with
nothing to compile; others on their devices, by a small jitted program per leaf shape. Integer
sums modulo 2**32 do not depend on the order of the reduction, so both give the same checksum,
and the checksum of a global array is the same however it is sharded and over however many
hosts: on a multi-host run every process computes it on its own shards, XLA's collectives
combine them, and every process reads the same replicated result (no host ever gathers a whole
array). A single changed element always changes the first sum (its
weight is odd); several changes escape both with probability about 2**-64. `restore` recomputes
the checksums of what it read and compares; a step that is unreadable (truncated file,
tensorstore error, bad JSON) or fails the comparison is logged as a warning naming the directory
and step, and the next older step is tried. With no intact step left, a `CheckpointError` names
the directory. Checkpoints written before the "integrity" item existed restore unverified.

Rotation. Orbax's own `max_to_keep` is off: after each save completes this module keeps the
newest `keep` steps plus the newest step whose state was finite, so a run that diverged can
always go back to good weights (`latest_finite_step`). A step is deleted by renaming its
directory to `.deleting-<step>-...` (atomic; orbax ignores the name) and then removing it, so a
crash mid-delete never leaves a half-deleted step that looks restorable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from kd_jax import multihost, sharding
from kd_jax.errors import CheckpointError, UserFileNotFoundError

log = logging.getLogger("kd_jax")

ITEMS = ("state", "data", "meta", "integrity")
_DELETING = ".deleting-"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_ALGO = "wsum32x2-v1"
_W1, _W2, _XOR = 0x9E3779B1, 0x85EBCA77, 0x5BD1E995  # the digest's weight constants.


# ------------------------------------------------------------------------------- checksums
def _bits_u32(x) -> jax.Array:
    """The array's bits as a flat uint32 vector (narrower dtypes widened, 64-bit ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    width = x.dtype.itemsize
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _digest(x) -> tuple[jax.Array, jax.Array]:
    u = _bits_u32(x)
    i = jax.lax.iota(jnp.uint32, u.shape[0])
    w1 = (i * jnp.uint32(_W1)) << 1 | jnp.uint32(1)
    w2 = ((i ^ jnp.uint32(_XOR)) * jnp.uint32(_W2)) << 1 | jnp.uint32(1)
    rot = (u << 13) | (u >> 19)
    return jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum(rot * w2, dtype=jnp.uint32)


def _finite(x) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _leaf_integrity(x) -> jax.Array:
    # One small program per leaf (shape, dtype, sharding), not one over the whole state: the
    # params and the optimizer's moments share their shapes, so a state compiles a handful of
    # these (also across stages and runs, through the compilation cache), where one program
    # over every leaf took 2-10 s of XLA:CPU compile per stage.
    a, b = _digest(x)
    return jnp.stack([a, b, _finite(x).astype(jnp.uint32)])


_HOST_CHUNK = 1 << 22  # elements per NumPy pass: bounds the temporaries to a few 16 MiB arrays.


def _host_bits_u32(a: np.ndarray) -> np.ndarray:
    """`_bits_u32` in NumPy."""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.bool_:
        return a.astype(np.uint32)
    if a.dtype.itemsize == 8:  # little-endian halves, as XLA's bitcast_convert_type.
        return a.view(np.uint32)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize])


def _host_leaf_integrity(x) -> tuple[int, int, bool]:
    """`_leaf_integrity` in NumPy (the same two sums modulo 2**32), chunk by chunk."""
    key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    host = np.asarray(jax.random.key_data(x) if key else x)  # one read of the array
    u_all = _host_bits_u32(host)
    a = b = 0
    for start in range(0, u_all.shape[0], _HOST_CHUNK):
        u = u_all[start : start + _HOST_CHUNK].astype(np.uint32)
        i = np.arange(start, start + u.shape[0], dtype=np.uint32)
        w1 = (i * np.uint32(_W1)) << np.uint32(1) | np.uint32(1)
        w2 = ((i ^ np.uint32(_XOR)) * np.uint32(_W2)) << np.uint32(1) | np.uint32(1)
        rot = (u << np.uint32(13)) | (u >> np.uint32(19))
        a = (a + int(np.sum(u * w1, dtype=np.uint32))) & 0xFFFFFFFF
        b = (b + int(np.sum(rot * w2, dtype=np.uint32))) & 0xFFFFFFFF
    finite = key or not jnp.issubdtype(host.dtype, jnp.inexact) or bool(np.isfinite(host).all())
    return a, b, finite


def _in_host_memory(x) -> bool:
    return getattr(x, "is_fully_addressable", True) and all(
        d.platform == "cpu" for d in x.sharding.device_set
    )


def integrity(state) -> tuple[dict[str, str], bool]:
    """({leaf path: "dtype[shape]:checksum"}, every float leaf finite) of a state pytree."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    # Device leaves: all dispatched before the first read. Host leaves: nothing to compile
    # (one program per leaf shape was most of a tiny run's checkpoint cost on XLA:CPU).
    results = [None if _in_host_memory(x) else _leaf_integrity(x) for x in leaves]
    read = iter(multihost.to_host([r for r in results if r is not None]))  # one read for all
    out, finite = {}, True
    for (path, _), x, r in zip(flat, leaves, results):
        a, b, ok = _host_leaf_integrity(x) if r is None else (int(v) for v in next(read))
        dt = "key" if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.name
        out[jax.tree_util.keystr(path)] = f"{dt}{list(x.shape)}:{a:08x}{b:08x}"
        finite = finite and bool(ok)
    return out, finite


class _Corrupt(Exception):
    pass


@dataclasses.dataclass
class ReadError:
    """What an item's handler raised while reading a step (returned, not raised)."""

    error: str

    def __str__(self) -> str:
        return self.error


def _ReadErrorsReturned(handler_cls):  # noqa: N802  (builds a handler, named for what it does)
    """An orbax item handler whose `restore` returns a `ReadError` instead of raising. Orbax's
    restore ends with a barrier of every process; a host whose read raised would skip it and the
    others would wait there (or pair it with the next collective). With the error returned,
    every host reaches the barrier, then they agree on the step (`_restore_step`). The handler
    keeps its class (orbax maps argument types to handler classes); only this instance's
    `restore` is wrapped."""
    handler = handler_cls()
    read = handler.restore

    def restore(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except Exception as e:  # tensorstore, orbax and json raise many types for bad files.
            return ReadError(f"{type(e).__name__}: {_short(e)}")

    handler.restore = restore
    return handler


def _checksum_problem(stored: dict, got: dict) -> str | None:
    """What is wrong with arrays whose checksums are `got` against the `stored` ones, or None."""
    missing, extra = sorted(set(stored) - set(got)), sorted(set(got) - set(stored))
    if missing or extra:
        return (
            f"the arrays read do not match the stored checksums: {len(missing)} stored "
            f"array(s) not read (first: {(missing or ['-'])[0]}), {len(extra)} read "
            f"array(s) without a checksum (first: {(extra or ['-'])[0]})"
        )
    bad = [p for p, c in got.items() if stored[p] != c]
    if bad:
        return (
            f"{len(bad)} array(s) fail their checksum (first: {bad[0]}: stored "
            f"{stored[bad[0]]}, read {got[bad[0]]})"
        )
    return None


_KEY = re.compile(r"\.(\w+)|\['((?:[^'\\]|\\.)*)'\]|\[(-?\d+)\]|\[\"([^\"]*)\"\]")


def canonical_path(keystr: str) -> str:
    """A leaf path as "/"-joined key names, however the tree spells it: the attribute of a
    dataclass (`.params`), a dict key (`['params']`) and a sequence index (`[0]`) alike, so a
    TrainState's checksums match the same arrays restored as plain dicts."""
    return "/".join(next(g for g in m.groups() if g is not None) for m in _KEY.finditer(keystr))


def _by_path(checksums: dict) -> dict:
    return {canonical_path(p): c for p, c in checksums.items()}


# ------------------------------------------------------------------------------- manager
@contextlib.contextmanager
def cpu_arrays_written_by_one_replica():
    """A process-level opt-in for CPU devices (the CLI and the tests use it): while the block
    runs, one replica writes each replicated array. Orbax's replica-parallel save splits every
    replicated array among its replicas, which on CPU devices (all in one host memory) saves
    nothing and compiles a slicing program per leaf shape. Off GPU/TPU devices it does nothing;
    the files are the same either way (one tensorstore array per leaf). Orbax's previous
    `jax.Array` handler is restored on exit."""
    if any(d.platform != "cpu" for d in jax.devices()):
        yield
        return
    previous = ocp.type_handlers.get_type_handler(jax.Array)
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    try:
        yield
    finally:
        ocp.type_handlers.register_type_handler(jax.Array, previous, override=True)


class Checkpointer:
    def __init__(
        self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False
    ):
        """`read_only`: a reader of a directory another process may be writing (export,
        notebooks, a `stage:` source): it never cleans up, rotates or saves."""
        self.read_only = read_only
        self.directory = os.path.abspath(directory)
        self.keep = max(1, int(keep))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=async_save, create=True
        )
        # Handlers named up front, so a fresh manager can read a step's metadata
        # (`restore_saved`) before any save or restore in this process.
        json_items = {
            k: _ReadErrorsReturned(ocp.JsonCheckpointHandler) for k in ITEMS if k != "state"
        }
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": _ReadErrorsReturned(ocp.StandardCheckpointHandler),
                **json_items,
            },
        )
        self._finite: dict[int, bool | None] = {}  # step -> meta["finite"], as read or saved.
        if jax.process_index() == 0 and not read_only:
            for name in os.listdir(self.directory):
                # A delete a crash interrupted; orbax's temporary directory of a save a kill
                # interrupted (`<step>.orbax-checkpoint-tmp-<time>`: never a restorable step).
                if name.startswith(_DELETING) or _ORBAX_TMP in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        """The newest step, as process 0 lists them (agreed by every process)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first, as process 0 lists them (every process acts on the
        same list, whatever its own listing of a shared directory shows at this moment)."""
        return multihost.leader_ints(sorted(self.manager.all_steps()), f"steps in {self.directory}")

    def save(self, step: int, state, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Saves `state` (and the data iterator's state, and `meta` plus `finite`) at `step`."""
        if self.read_only:
            raise RuntimeError(f"Checkpointer of {self.directory} is read-only.")
        if not force and not self.manager.should_save(step):
            return False
        self.manager.wait_until_finished()  # orbax would wait for the previous save anyway.
        self._rotate()
        checksums, finite = integrity(state)
        meta = {**meta, "finite": finite}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
            integrity=ocp.args.JsonSave({"algo": _ALGO, "finite": finite, "arrays": checksums}),
        )
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._finite[step] = finite
        return saved

    def _has_item(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def _restore_step(self, abstract_state, step: int):
        """Reads and verifies `step`. Each phase ends with the hosts agreeing: a step one host
        cannot read, or whose arrays fail their checksums, is corrupt for every host, so all of
        them fall back to the same older step (and none waits in a collective another left)."""
        args = dict(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        verify = self._has_item(step, "integrity")
        if verify:
            args["integrity"] = ocp.args.JsonRestore()
        problem = None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
            problem = next(
                (f"unreadable ({v})" for v in out.values() if isinstance(v, ReadError)), None
            )
        except Exception as e:  # tensorstore, orbax and json raise many types for bad files.
            problem = f"unreadable ({type(e).__name__}: {_short(e)})"
        if not multihost.all_true([problem is None], f"step {step} of {self.directory} readable"):
            raise _Corrupt(problem or "unreadable on another host")
        if verify:
            got = _by_path(integrity(out["state"])[0])  # a collective: after the agreement above
            problem = _checksum_problem(_by_path((out["integrity"] or {}).get("arrays", {})), got)
        if not multihost.all_true([problem is None], f"step {step} of {self.directory} intact"):
            raise _Corrupt(problem or "its stored checksums differ on another host")
        return out["state"], out["data"], out["meta"]

    def restore_saved(self, mesh, rules, step: int | None = None) -> dict:
        """The saved state as a plain dict tree, shaped by the checkpoint's own metadata (no
        model, data or optimizer needed), laid out on `mesh` by the sharding `rules` (the
        leading axis of each leaf is the seed axis)."""
        newest = self.latest_step() if step is None else step
        if newest is None:
            raise UserFileNotFoundError(f"No complete checkpoint in {self.directory}.")
        tree = self.manager.item_metadata(newest)["state"].tree
        shapes = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
            tree,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )
        target = abstract(shapes, sharding.tree_shardings(shapes, mesh, rules, leading=1))
        return self.restore(target, step)[0]

    def restore(self, abstract_state, step: int | None = None):
        """-> (state, data_state, meta), placed with `abstract_state`'s shardings.

        `step=None`: the newest intact step; a corrupt newer step is skipped with a warning.
        An explicit `step` that is corrupt is a CheckpointError."""
        if step is not None:
            try:
                return self._restore_step(abstract_state, step)
            except _Corrupt as e:
                raise CheckpointError(
                    f"Checkpoint step {step} in {self.directory} is corrupt: {e}."
                ) from e
        steps = self.all_steps()[::-1]
        if not steps:
            raise UserFileNotFoundError(f"No complete checkpoint in {self.directory}.")
        errors = []
        for s in steps:
            try:
                out = self._restore_step(abstract_state, s)
            except _Corrupt as e:
                log.warning(
                    "checkpoint %s step %d is corrupt (%s); trying an older step",
                    self.directory,
                    s,
                    e,
                )
                errors.append((s, e))
                continue
            if errors:
                log.warning("checkpoint %s: restored step %d instead", self.directory, s)
            return out
        s, e = errors[0]
        raise CheckpointError(
            f"No intact checkpoint in {self.directory}: all {len(steps)} step(s) {steps} fail to "
            f"restore (newest, step {s}: {e}). If the model or config changed since they were "
            "written, use a new workdir; otherwise delete the directory to start over."
        )

    def read_meta(self, step: int | None = None) -> dict:
        """The meta of `step` (default: the newest step whose meta is readable)."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        err = None
        for s in steps:
            try:
                meta = self.manager.restore(
                    s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                if isinstance(meta, ReadError):
                    raise _Corrupt(str(meta))
                return meta
            except Exception as e:
                log.warning("checkpoint %s step %d: unreadable meta (%s)", self.directory, s, e)
                err = e
        raise CheckpointError(f"No readable checkpoint meta in {self.directory} ({err}).")

    def is_finite(self, step: int) -> bool | None:
        """meta["finite"] of `step`: True/False, or None when unknown (an older checkpoint)."""
        if step not in self._finite:
            try:
                self._finite[step] = self.read_meta(step).get("finite")
            except CheckpointError:
                self._finite[step] = None
        return self._finite[step]

    def latest_finite_step(self) -> int | None:
        """The newest step whose state was all finite when saved (as process 0 reads the
        metas, agreed by every process), or None."""
        self.manager.wait_until_finished()
        found = next((s for s in self.all_steps()[::-1] if self.is_finite(s)), None)
        found = multihost.leader_value(-1 if found is None else found, "latest finite step")
        return None if found < 0 else found

    def _rotate(self) -> None:
        """Deletes all but the newest `keep` steps and the newest finite one (saves finished)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if len(steps) <= self.keep:
            return
        keep = set(steps[: self.keep])
        if not any(self.is_finite(s) for s in keep):
            finite = next((s for s in steps if self.is_finite(s)), None)
            if finite is not None:
                keep.add(finite)
        doomed = [s for s in steps if s not in keep]
        if not doomed:
            return
        if jax.process_index() == 0:
            for s in doomed:
                src = os.path.join(self.directory, str(s))
                dst = os.path.join(self.directory, f"{_DELETING}{s}-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(src, dst)  # atomic: the step is gone or whole, never half.
                    shutil.rmtree(dst, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kd_jax_ckpt_rotate_{self.directory}")
        for s in doomed:
            self._finite.pop(s, None)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if not self.read_only:
            self._rotate()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _short(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return text if len(text) <= n else text[:n] + "..."


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying target shardings, for a sharded restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def load_params(path: str, abstract_params):
    """Params from a standalone orbax checkpoint (e.g. a trained teacher exported elsewhere)."""
    if not os.path.exists(path):
        raise UserFileNotFoundError(
            f"Params checkpoint '{path}' not found. teacher.init / student.init take '', "
            "'stage:<name>', 'pretrained:<name>' (e.g. 'pretrained:hf_bert:<dir>') or the path "
            "of an orbax params checkpoint."
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(path), abstract_params)
    except Exception as e:
        raise CheckpointError(
            f"Params checkpoint '{path}' cannot be restored ({type(e).__name__}: {_short(e)})."
        ) from e
