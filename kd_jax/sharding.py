"""Mesh construction and rule-based parameter sharding (FSDP by config, not by code)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.errors import ConfigValueError

AXES = ("data", "fsdp", "model")
# Batches are split over every axis that is not model-parallel.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh; one size may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ConfigValueError(f"At most one mesh axis may be -1, got {dict(zip(AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigValueError(
                f"{len(devices)} devices do not divide into mesh {dict(zip(AXES, sizes))}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigValueError(
            f"Mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but "
            f"{len(devices)} are available; set config.mesh sizes (one may be -1)."
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_str(path) -> str:
    """`jax.tree_util` key path -> 'student/Conv_0/kernel'."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], fsdp: int, leading: int) -> P:
    # Shard the largest dimension that divides evenly; leading (seed) axes stay unsharded.
    spec = [None] * len(shape)
    dims = sorted(range(leading, len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if fsdp > 1 and shape[d] % fsdp == 0 and shape[d] >= fsdp:
            spec[d] = "fsdp"
            break
    return P(*spec)


def _model_spec(shape: Sequence[int], dim: int, model: int, leading: int, name: str) -> P:
    # Tensor parallelism: dimension `dim` of the unstacked array (negative from the end) is split
    # over the model axis; the leading (seed) axes stay unsharded.
    d = dim + len(shape) if dim < 0 else dim + leading
    if not leading <= d < len(shape):
        raise ConfigValueError(
            f"Sharding rule 'model:{dim}' for '{name}': no such dimension in {shape}."
        )
    if shape[d] % model:
        raise ConfigValueError(
            f"Sharding rule 'model:{dim}' for '{name}': dimension {shape[d]} of {tuple(shape)} is "
            f"not divisible by the model axis size {model}; set mesh.model to a divisor."
        )
    spec = [None] * len(shape)
    spec[d] = "model"
    return P(*spec)


def _check_action(action: str) -> None:
    if action in ("fsdp", "replicate"):
        return
    kind, _, dim = action.partition(":")
    if kind == "model" and dim.lstrip("-").isdigit():
        return
    raise ConfigValueError(
        f"Unknown sharding action '{action}'; use 'fsdp', 'replicate' or 'model:<dim>' "
        "(tensor parallelism over the mesh's model axis, e.g. 'model:-1' for a kernel's outputs)."
    )


def tree_shardings(
    tree, mesh: Mesh, rules: Sequence[Sequence[str]], *, prefix: str = "", leading: int = 0
):
    """NamedShardings for a pytree of (abstract) arrays from (regex, action) rules.

    Rules are searched (`re.search`) in leaf paths such as "params/student/dense0/kernel" or
    "opt_state/0/mu/student/dense0/kernel", so "student/.*kernel" also shards optimizer moments.
    Actions: "fsdp" shards the largest dimension divisible by the fsdp axis size; "model:<dim>"
    splits dimension <dim> (of the unstacked array; negative counts from the end) over the
    model axis (tensor parallelism: a model declares its rules, e.g. BERT's attention and MLP
    kernels); "replicate".

    `leading` axes (the stacked-seed axis) are never sharded. Unmatched leaves replicate.
    """
    fsdp, model = mesh.shape["fsdp"], mesh.shape["model"]
    compiled = [(re.compile(r), a) for r, a in rules]
    for _, action in compiled:
        _check_action(action)

    def one(path, leaf):
        name = prefix + path_str(path)
        for regex, action in compiled:
            if regex.search(name):
                if action == "fsdp" and getattr(leaf, "ndim", 0) > leading:
                    return NamedSharding(mesh, _fsdp_spec(leaf.shape, fsdp, leading))
                if action.startswith("model:") and getattr(leaf, "ndim", 0) > leading:
                    dim = int(action.split(":", 1)[1])
                    return NamedSharding(mesh, _model_spec(leaf.shape, dim, model, leading, name))
                break
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def check_batch(mesh: Mesh, size: int, key: str) -> None:
    """A global batch of `size` (config key `key`) must split evenly over the mesh's batch
    shards and the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if size % shards or size % jax.process_count():
        raise ConfigValueError(
            f"{key}={size} must be divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} and by {jax.process_count()} process(es); "
            f"use a multiple of {shards * jax.process_count()}."
        )


def host_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process feeds: those its devices hold. Contiguous
    for standard meshes: global / processes rows when the batch axes span the processes; every
    row when only the model axis does (each host then feeds the whole batch, and the processes
    holding the same rows feed the same rows)."""
    sharding = batch_sharding(mesh)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    blocks = sorted(
        {
            (idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
            for idx in index_map.values()
        }
    )
    start, stop = blocks[0][0], blocks[-1][1]
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        raise ConfigValueError(
            "This process's devices do not hold a contiguous block of the batch; "
            "build the mesh from jax.devices() in process order."
        )
    return slice(start, stop)


def make_global(mesh: Mesh, local_batch, global_batch: int):
    """Host-local numpy arrays -> global jax arrays sharded over the batch axes."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

    return jax.tree.map(one, local_batch)
