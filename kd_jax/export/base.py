"""What every export format shares: the student (`Student`), the registry of writers (`WRITERS`,
each declaring its format and the student models it writes), the stored dtypes and helpers.

A format module registers its writer when imported:

    @register("hf_bert", format="hf", models=("bert", ...))
    def _write(student, out, *, dtype, tokenizer, notes) -> list[str]: ...

`writer(format, student)` picks the entry for a student; a (format, model) pair no entry
declares is refused with the models that format supports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping

import numpy as np

from kd_jax import config as config_lib
from kd_jax import models
from kd_jax.errors import ConfigValueError
from kd_jax.registry import Registry

log = logging.getLogger("kd_jax")

FORMATS = ("hf", "gguf", "npz")  # the --format choices, in the CLI's order; writers in WRITERS
DTYPES = {"float32": np.float32, "float16": np.float16}

# writer(student, out, *, dtype, tokenizer, notes) -> the files written; meta: format, models
# (the student models it writes; None: any registered model).
WRITERS: Registry[Callable[..., list[str]]] = Registry("export writer")


def register(name: str, *, format: str, models=None):  # noqa: A002  (the CLI flag's name)
    """Decorator: registers a writer under `name` for `format` and the student `models` it
    supports (None: any)."""
    if format not in FORMATS:
        raise ValueError(f"export format '{format}' is not one of {FORMATS}.")
    return WRITERS.register(name, format=format, models=None if models is None else tuple(models))


def check_formats() -> None:
    """Every format in FORMATS has a writer (the format modules are imported)."""
    have = {entry.meta["format"] for _, entry in WRITERS.items()}
    missing = [f for f in FORMATS if f not in have]
    if missing:
        raise RuntimeError(f"export formats {missing} have no registered writer.")


def supported_models(format: str) -> list[str]:  # noqa: A002
    """The student models the writers of `format` declare, in registry order."""
    out = []
    for _, entry in WRITERS.items():
        if entry.meta["format"] == format:
            out += [m for m in entry.meta["models"] or () if m not in out]
    return out


def writer(format: str, student: Student) -> Callable[..., list[str]]:  # noqa: A002
    """The registered writer of `format` for `student.model`, else a ConfigValueError naming the
    models that format supports."""
    for _, entry in WRITERS.items():
        declared = entry.meta["models"]
        if entry.meta["format"] == format and (declared is None or student.model in declared):
            return entry.obj
    where = f"stage '{student.stage}' " if student.stage else ""
    raise ConfigValueError(
        f"{where}student model '{student.model}' cannot be exported as '{format}' (that format "
        f"supports {supported_models(format)}); use --format=npz."
    )


# ----------------------------------------------------------------------------- the student
@dataclasses.dataclass
class Student:
    """One seed replica of a stage's final student, as NumPy arrays."""

    model: str
    kwargs: dict
    dtype: str  # the stage's compute dtype (params are float32)
    variables: dict  # {"params", + e.g. "batch_stats"}
    stage: str = ""
    step: int = 0
    seed: int = 0
    teacher: dict = dataclasses.field(default_factory=dict)  # the stage's teacher.{model, ...}

    def module(self):
        return build_module(self.model, self.kwargs, self.dtype)


def build_module(model: str, kwargs: Mapping, dtype: str = "float32"):
    """The registered `model` with `kwargs` as read from JSON (lists back to tuples)."""
    return models.build(config_lib.model(model, **tuples(dict(kwargs))), dtype=dtype)


def tuples(x):
    """JSON lists back to the tuples a config had (model fields such as widths)."""
    if isinstance(x, dict):
        return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(tuples(v) for v in x)
    return x


# ----------------------------------------------------------------------------- helpers
def warn(notes: list[str] | None, msg: str, *args) -> None:
    """Logs a warning and records it in `notes` (the export's result) when given."""
    log.warning(msg, *args)
    if notes is not None:
        notes.append(msg % args)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict -> {"/"-joined path: array}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return path


def llama_layers(params: Mapping, num_layers: int, names: Mapping[str, str]):
    """(layer i, our module, its name in `names`, the [out, in] weight (norm scales as they
    are)) for each of a scanned Llama's per-layer weights (`params["layers"]`)."""
    for ours, name in names.items():
        leaf = "scale" if ours.endswith("norm") else "kernel"
        stacked = np.asarray(params["layers"][ours][leaf])
        for i in range(num_layers):
            yield i, ours, name, stacked[i] if leaf == "scale" else stacked[i].T
