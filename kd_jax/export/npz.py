"""`--format=npz`, any registered model: variables.npz (params + batch_stats, "/"-joined
paths) and architecture.json {model, kwargs, dtype, ...}; `load_npz(dir)` -> (module,
variables)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from kd_jax.errors import UserFileNotFoundError, corrupt_file
from kd_jax.export.base import Student, build_module, flatten, register, write_json

ARCHITECTURE_FILE = "architecture.json"
VARIABLES_FILE = "variables.npz"


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{"/"-joined path: array} -> the nested dict (`base.flatten`'s inverse)."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def write_npz(out: str, student: Student) -> list[str]:
    """variables.npz + architecture.json {model, kwargs, dtype, stage, step, seed}."""
    os.makedirs(out, exist_ok=True)
    arrays = flatten(student.variables)
    path = os.path.join(out, VARIABLES_FILE)
    np.savez(path, **arrays)
    record = {
        "model": student.model,
        "kwargs": student.kwargs,
        "dtype": student.dtype,
        "collections": sorted(student.variables),
        "stage": student.stage,
        "step": student.step,
        "seed": student.seed,
    }
    arch = os.path.join(out, ARCHITECTURE_FILE)
    write_json(arch, record)
    return [path, arch]


@register("npz", format="npz")  # any registered model
def _write(student: Student, out: str, *, dtype, tokenizer, notes) -> list[str]:
    del dtype, tokenizer, notes  # the variables are stored as trained (float32)
    return write_npz(out, student)


def load_npz(directory: str):
    """-> (module, variables) of a directory written by `--format=npz`."""
    arch = os.path.join(str(directory), ARCHITECTURE_FILE)
    path = os.path.join(str(directory), VARIABLES_FILE)
    for f in (arch, path):
        if not os.path.isfile(f):
            raise UserFileNotFoundError(f"No {os.path.basename(f)} in {directory}.")
    try:
        with open(arch) as f:
            record = json.load(f)
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
    except Exception as e:
        raise corrupt_file(directory, "exported student", e) from e
    module = build_module(
        record["model"], record.get("kwargs") or {}, record.get("dtype", "float32")
    )
    return module, unflatten(flat)
