"""Export a distilled student to the formats people deploy.

    python -m kd_jax.export --workdir=W --stage=S [--seed=i] [--step=N] --format=hf|gguf|npz \
        --out=DIR [--dtype=float32|float16] [--tokenizer=PATH]

or `kd_jax.export.export(workdir, stage, out=..., format=...)` in a notebook. The stage's final
(or `step`) checkpoint is read with the config saved in its metadata (no data, teacher or
optimizer is built); one seed replica is taken and everything that is not the student (the
adapters under params["aux"], the optimizer state) is left out.

One module per format, each registering its writer and the student models it supports in
`WRITERS` (`base.register`):
  npz.py       any registered model: variables.npz + architecture.json; `load_npz(dir)`.
  hf_bert.py   `hf` for `bert` (and the encoder of `bert_classifier` / `bert_qa` / `bert_mlm`):
               BertModel safetensors, tokenizer and sentence-transformers files.
  hf_llama.py  `hf` for `llama` / `llama_packed`: LlamaForCausalLM safetensors (+ tokenizer).
  gguf.py      `gguf` for `llama` / `llama_packed`: one .gguf (F32 or F16), llama.cpp's names.
The CLI is `__main__.py`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import sharding, stage_source
from kd_jax.errors import ConfigValueError, UserFileNotFoundError
from kd_jax.export import gguf, hf_bert, hf_llama, npz  # noqa: F401  (register their writers)
from kd_jax.export.base import (
    DTYPES,
    FORMATS,
    WRITERS,
    Student,
    check_formats,
    supported_models,
    writer,
)
from kd_jax.export.gguf import GGUF_FILE, LLAMA_MODELS, gguf_tensors, permute_qk, write_gguf
from kd_jax.export.hf_bert import BERT_MODELS, bert_hf_config, bert_hf_state, write_hf_bert
from kd_jax.export.hf_llama import llama_hf_config, llama_hf_state, write_hf_llama
from kd_jax.export.npz import ARCHITECTURE_FILE, VARIABLES_FILE, load_npz, write_npz
from kd_jax.models.llama_loading import llama_from_hf_state, load_hf_llama

check_formats()


# ----------------------------------------------------------------------------- checkpoints
def stage_dirs(workdir: str) -> dict[str, str]:
    """{stage name: its directory} of every stage in `workdir` that has checkpoints ("main" is
    a single-stage run's workdir itself)."""
    out = {}
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        out["main"] = workdir
    if os.path.isdir(workdir):
        for name in sorted(os.listdir(workdir)):
            if os.path.isdir(os.path.join(workdir, name, "checkpoints")):
                out[name] = os.path.join(workdir, name)
    return out


def _one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])


def load_student(workdir: str, stage: str | None = None, *, seed: int = 0, step=None) -> Student:
    """The student of `stage` in `workdir` (its final checkpoint, or `step`), seed replica
    `seed`. Errors name the stage, the step and the ones that exist."""
    workdir = str(workdir)
    dirs = stage_dirs(workdir)
    if not dirs:
        raise UserFileNotFoundError(f"No stage with checkpoints in workdir {workdir}.")
    if stage is None:
        if len(dirs) > 1:
            raise ConfigValueError(f"Name the stage to export (--stage); stages: {sorted(dirs)}.")
        stage = next(iter(dirs))
    if stage not in dirs:
        raise UserFileNotFoundError(
            f"Stage '{stage}' has no checkpoints in {workdir}; stages with checkpoints: "
            f"{sorted(dirs)}."
        )
    ckptr = ckpt_lib.Checkpointer(os.path.join(dirs[stage], "checkpoints"), async_save=False)
    try:
        steps = ckptr.all_steps()
        if step is not None and int(step) not in steps:
            raise UserFileNotFoundError(
                f"Stage '{stage}' has no checkpoint at step {step}; its steps: {steps}."
            )
        meta = ckptr.read_meta(None if step is None else int(step))
    finally:
        ckptr.close()
    cfg = meta.get("config") or {}
    student = cfg.get("student") or {}
    if not student.get("model"):
        raise ConfigValueError(f"Stage '{stage}' checkpoint metadata names no student model.")
    num_seeds = int(meta.get("num_seeds", cfg.get("num_seeds", 1)))
    if not 0 <= seed < num_seeds:
        raise ConfigValueError(
            f"Stage '{stage}' trained {num_seeds} seed(s); --seed={seed} is not in "
            f"0..{num_seeds - 1}."
        )
    rules = ((".*", "replicate"),)
    variables, got = stage_source.restore_student(
        dirs[stage], _one_device_mesh(), rules, None if step is None else int(step)
    )
    one = jax.tree.map(lambda v: np.asarray(jax.device_get(v))[seed], variables)
    return Student(
        model=student["model"],
        kwargs=dict(student.get("kwargs") or {}),
        dtype=cfg.get("compute_dtype", "float32"),
        variables=one,
        stage=stage,
        step=got,
        seed=seed,
        teacher=dict(cfg.get("teacher") or {}),
    )


# ----------------------------------------------------------------------------- export
def export(
    workdir: str,
    stage: str | None = None,
    *,
    out: str,
    format: str = "npz",  # noqa: A002  (the CLI flag's name)
    seed: int = 0,
    step: int | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> dict:
    """Exports `stage`'s student from `workdir` to `out` -> {"format", "files", "stage", "step",
    "seed", "model", "notes"} ("notes": the warnings of the export, e.g. a BERT without a
    pooler). `dtype`: the stored weights' type (hf, gguf; GGUF keeps norms float32);
    `tokenizer`: a .gguf (llama) or HF tokenizer directory (bert) to take the tokenizer from,
    instead of the bundled teacher's when the vocabulary sizes match."""
    _check_format(format, dtype)
    student = load_student(workdir, stage, seed=seed, step=step)
    notes: list[str] = []
    files = export_student(
        student, out, format=format, dtype=dtype, tokenizer=tokenizer, notes=notes
    )
    return {
        "format": format,
        "files": files,
        "stage": student.stage,
        "step": student.step,
        "seed": student.seed,
        "model": student.model,
        "notes": notes,
    }


def _check_format(format: str, dtype: str) -> None:  # noqa: A002
    if format not in FORMATS:
        raise ConfigValueError(f"Unknown export format '{format}'; use one of {FORMATS}.")
    if dtype not in DTYPES:
        raise ConfigValueError(f"Unknown export dtype '{dtype}'; use one of {sorted(DTYPES)}.")


def export_student(
    student: Student,
    out: str,
    *,
    format: str = "npz",  # noqa: A002
    dtype: str = "float32",
    tokenizer: str | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """Writes `student` to directory `out` in `format` with the writer registered for its model
    (`WRITERS`); returns the files written. The export's warnings are appended to `notes`."""
    _check_format(format, dtype)
    write = writer(format, student)
    return write(student, out, dtype=dtype, tokenizer=tokenizer, notes=notes)


def main(argv=None) -> int:
    """The CLI (`python -m kd_jax.export`, kd_jax/export/__main__.py)."""
    from kd_jax.export.__main__ import main as cli

    return cli(argv)


__all__ = [
    "ARCHITECTURE_FILE",
    "BERT_MODELS",
    "DTYPES",
    "FORMATS",
    "GGUF_FILE",
    "LLAMA_MODELS",
    "VARIABLES_FILE",
    "WRITERS",
    "Student",
    "bert_hf_config",
    "bert_hf_state",
    "export",
    "export_student",
    "gguf_tensors",
    "llama_from_hf_state",
    "llama_hf_config",
    "llama_hf_state",
    "load_hf_llama",
    "load_npz",
    "load_student",
    "main",
    "permute_qk",
    "stage_dirs",
    "supported_models",
    "write_gguf",
    "write_hf_bert",
    "write_hf_llama",
    "write_npz",
]
