"""The teacher on its own devices (`teacher.placement = "submesh"`).

The run's devices are split in two: `teacher.devices` names the teacher's, the student trains on
the rest. Each side has its own mesh (`teacher.mesh` for the teacher's, the stage's `config.mesh`
for the student's; -1 takes the side's remaining devices). The teacher's variables live only on
its devices (FSDP over the teacher mesh's fsdp axis, replicated over the rest); its forward is
its own jitted program there. Only what the objective reads (its teacher feature paths: logits,
features, top-k) moves to the student's devices, already in the layout of the student's batch,
and enters the student's step as the `cache` placement's features do (`batch["teacher"]`,
[B, S, ...] with the seed axis S second).

Overlap: `Ahead` prepares batch n+1 (its teacher forward and the move) when the loop takes batch
n, so the teacher's program for n+1 is dispatched before the student's step n; the two run at
once on their disjoint devices (JAX's asynchronous dispatch), and the loop waits only for
metrics. Kinds whose step rewrites the batch before the teacher reads it (on-policy samples,
MLM masking) have no such split: they are a ConfigValueError here (use "replicated" or
"sharded").

Processes: every process feeds the rows of the global batch it owns on the student's mesh, and
those same rows on the teacher's mesh, so the teacher's input never crosses hosts and each
process moves only its own rows of the features. Hence, with several processes, each one must
own devices of both meshes (`teacher.devices = "per_process:N"`: the last N local devices of
every process); a teacher mesh of whole hosts would need cross-host transfers and an input
pipeline of its own, which kd_jax does not have.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from kd_jax import sharding
from kd_jax import teacher as teacher_lib
from kd_jax.errors import ConfigValueError
from kd_jax.replicas import over_seeds

FORMS = (
    "an integer N or 'last:N' (the last N devices, in process order), 'first:N', or "
    "'per_process:N' (the last N devices of every process)"
)


def active(cfg) -> bool:
    """Whether stage config `cfg` places its teacher on a sub-mesh."""
    return cfg.teacher.placement == "submesh" and bool(cfg.teacher.model)


def _parse(spec, cfg) -> tuple[str, int]:
    """`teacher.devices` -> (form, count)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        form, count = "last", spec
    elif isinstance(spec, str) and spec.strip():
        form, _, num = spec.strip().rpartition(":")
        form = form or "last"
        if form not in ("last", "first", "per_process") or not num.isdigit():
            raise ConfigValueError(
                f"config.teacher.devices={spec!r}: use {FORMS}, e.g. 'last:4' for 4 of 8."
            )
        count = int(num)
    elif spec in ("", None):
        sizes = [int(cfg.teacher.mesh[a]) for a in sharding.AXES]
        if -1 in sizes:
            raise ConfigValueError(
                "teacher.placement='submesh' needs the teacher's devices: set "
                f"config.teacher.devices to {FORMS}, or every teacher.mesh size (no -1)."
            )
        form, count = "last", math.prod(sizes)
    else:
        raise ConfigValueError(f"config.teacher.devices={spec!r}: use {FORMS}.")
    return form, count


def split_devices(cfg, devices) -> tuple[list, list]:
    """(student devices, teacher devices) of `devices` by `config.teacher.devices`."""
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    form, n = _parse(cfg.teacher.devices, cfg)
    spec = cfg.teacher.devices
    if form == "per_process":
        by_proc: dict[int, list] = {}
        for d in devices:
            by_proc.setdefault(d.process_index, []).append(d)
        local = min(len(v) for v in by_proc.values())
        if not 1 <= n < local:
            raise ConfigValueError(
                f"config.teacher.devices={spec!r}: a process has {local} devices; the teacher "
                f"needs 1 to {local - 1} of each process's, the student the rest."
            )
        teacher = [d for v in by_proc.values() for d in v[-n:]]
    else:
        if not 1 <= n < len(devices):
            raise ConfigValueError(
                f"config.teacher.devices={spec!r}: the run has {len(devices)} devices; the "
                f"teacher needs 1 to {len(devices) - 1} of them, the student the rest."
            )
        teacher = devices[-n:] if form == "last" else devices[:n]
    ids = {d.id for d in teacher}
    student = [d for d in devices if d.id not in ids]
    if jax.process_count() > 1:
        for side, devs in (("teacher", teacher), ("student", student)):
            missing = sorted({d.process_index for d in devices} - {d.process_index for d in devs})
            if missing:
                raise ConfigValueError(
                    f"config.teacher.devices={spec!r} leaves process(es) {missing} without "
                    f"{side} devices; with several processes each one feeds its rows of the batch "
                    "to both meshes: use 'per_process:N' (N of every process's devices)."
                )
    return student, teacher


def _mesh(mesh_cfg, devices, what: str) -> Mesh:
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except ConfigValueError as e:
        raise ConfigValueError(
            f"teacher.placement='submesh': the {what} ({len(devices)} devices): {e}"
        ) from e


def split(cfg, mesh: Mesh) -> tuple[Mesh, Mesh | None]:
    """(the student's mesh, the teacher's mesh) of a stage on the run's `mesh`; (mesh, None)
    unless the stage places its teacher on a sub-mesh. Every bad split is a ConfigValueError
    naming the setting."""
    if not active(cfg):
        return mesh, None
    s_devs, t_devs = split_devices(cfg, list(mesh.devices.flat))
    s_mesh = _mesh(cfg.mesh, s_devs, "student's config.mesh")
    t_mesh = _mesh(cfg.teacher.mesh, t_devs, "teacher's config.teacher.mesh")
    batch = cfg.data.batch_size
    shards = t_mesh.shape["data"] * t_mesh.shape["fsdp"]
    if batch % shards:
        raise ConfigValueError(
            f"data.batch_size={batch} must be divisible by the {shards} batch shards of the "
            f"teacher's mesh {dict(t_mesh.shape)}; change config.teacher.mesh or the batch size."
        )
    if jax.process_count() > 1:
        rows = sharding.host_batch_slice(s_mesh, batch), sharding.host_batch_slice(t_mesh, batch)
        if rows[0] != rows[1]:
            raise ConfigValueError(
                f"This process feeds rows {rows[0]} of the batch to the student's mesh but rows "
                f"{rows[1]} to the teacher's; give both meshes the same data x fsdp layout over "
                "the processes (e.g. teacher.mesh.data = -1 with 'per_process:N' devices)."
            )
    return s_mesh, t_mesh


def move(x: jax.Array, dst: NamedSharding, *, piecewise: bool | None = None) -> jax.Array:
    """`x` (batch-sharded on the teacher's devices) laid out as `dst` on the student's. One
    process: `jax.device_put`. Several: each process copies the rows its student devices need
    from its own teacher devices, which hold them (`split` checked that), device to device."""
    if piecewise is None:
        piecewise = jax.process_count() > 1
    if not piecewise:
        return jax.device_put(x, dst)
    n = x.shape[0]
    held: dict[tuple[int, int], jax.Array] = {}
    for s in x.addressable_shards:
        rows = s.index[0] if s.index else slice(None)
        held.setdefault((rows.start or 0, n if rows.stop is None else rows.stop), s.data)
    arrays = []
    for device, index in dst.addressable_devices_indices_map(x.shape).items():
        rows = index[0] if index else slice(None)
        a, b = rows.start or 0, n if rows.stop is None else rows.stop
        pieces = [
            jax.device_put(data[max(a, lo) - lo : min(b, hi) - lo], device)
            for (lo, hi), data in sorted(held.items())
            if lo < b and hi > a
        ]
        arrays.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
    return jax.make_array_from_single_device_arrays(x.shape, dst, arrays)


class Feed:
    """`feed(local)`: this process's host batch -> the student's global batch with
    `batch["teacher"]`, the teacher's features computed on its own mesh and moved.

    `teacher`: a `kd_jax.teacher.Teacher` loaded on `t_mesh`; `paths`: the feature paths the
    objective reads. A teacher per seed (axis 0) runs once per seed; a shared one once, its
    features repeated over the seeds (as the cache placement stores them)."""

    def __init__(self, teacher, paths, s_mesh: Mesh, t_mesh: Mesh, data, num_seeds, seeds_in_step):
        self.teacher, self.s_mesh, self.t_mesh = teacher, s_mesh, t_mesh
        self.global_batch = data.global_batch
        self.inputs = tuple(teacher.inputs)

        def one(v, x):
            return teacher_lib.forward(teacher.module, self.inputs, paths, v, x)

        if teacher.axis is None:

            def fwd(v, x):
                feats = one(v, x)
                return jax.tree.map(
                    lambda f: jnp.broadcast_to(f[:, None], (f.shape[0], num_seeds, *f.shape[1:])),
                    feats,
                )
        else:
            seeded = over_seeds(one, (0, None), seeds_in_step)

            def fwd(v, x):
                return jax.tree.map(lambda f: jnp.moveaxis(f, 0, 1), seeded(v, x))

        x = dict(zip(self.inputs, data.abstract_inputs(self.inputs)))
        shapes = jax.eval_shape(fwd, teacher.variables, x)
        t_sh = jax.tree.map(lambda a: sharding.batch_sharding(t_mesh, a.ndim), shapes)
        self.shardings = jax.tree.map(lambda a: sharding.batch_sharding(s_mesh, a.ndim), shapes)
        # The features as the student's step receives them (its ahead-of-time lowering).
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.shardings
        )
        self.forward = jax.jit(fwd, out_shardings=t_sh)

    def features(self, local: dict) -> dict:
        """The teacher's features of a host batch, on the student's devices (dispatched, not
        awaited)."""
        x = sharding.make_global(self.t_mesh, {k: local[k] for k in self.inputs}, self.global_batch)
        feats = self.forward(self.teacher.variables, x)
        return jax.tree.map(move, feats, self.shardings)

    def __call__(self, local: dict) -> dict:
        feats = self.features(local)
        batch = sharding.make_global(self.s_mesh, local, self.global_batch)
        batch["teacher"] = feats
        return batch


class Ahead:
    """The training iterator one batch ahead: `next()` gives batch n (prepared by `prepare`)
    after starting batch n+1's, so its teacher forward runs during the student's step n;
    `get_state()` is the data iterator's state after batch n (what a checkpoint after step n
    resumes from). `count`: the batches the loop takes; none is prepared ahead beyond them."""

    def __init__(self, it, prepare, count: int):
        self.it, self.prepare, self.left = it, prepare, count
        self.state = it.get_state()
        self.next_ = self._take() if count > 0 else None

    def _take(self):
        self.left -= 1
        local = next(self.it)
        return self.prepare(local), self.it.get_state()

    def __next__(self):
        batch, self.state = self.next_ if self.next_ is not None else self._take()
        self.next_ = self._take() if self.left > 0 else None
        return batch

    def get_state(self):
        return self.state
