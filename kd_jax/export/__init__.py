"""Export a distilled student to the formats people deploy.

    python -m kd_jax.export --workdir=W --stage=S [--seed=i] [--step=N] --format=hf|gguf|npz \
        --out=DIR [--dtype=float32|float16] [--tokenizer=PATH] [--overwrite] [--allow_unfinished]

or `kd_jax.export.export(workdir, stage, out=..., format=...)` in a notebook. The stage's final
checkpoint (an unfinished stage, or one a live run holds, needs `step`: `source.py`) is read,
verified, with the config saved in its metadata (no data, teacher or optimizer is built); one
seed replica is taken and everything that is not the student (the adapters under
params["aux"], the optimizer state) is left out.

Nothing is half-written: the files are built in a temporary directory beside `out` and renamed
into place when complete; a non-empty `out` is refused unless `overwrite`, and a full disk
leaves `out` as it was, with one message.

One module per format, each registering its writer and the student models it supports in
`WRITERS` (`base.register`):
  npz.py       any registered model: variables.npz + architecture.json; `load_npz(dir)`.
  hf_bert.py   `hf` for `bert` (and the encoder of `bert_classifier` / `bert_qa` / `bert_mlm`):
               BertModel safetensors, tokenizer and sentence-transformers files.
  hf_llama.py  `hf` for `llama` / `llama_packed`: LlamaForCausalLM safetensors (+ tokenizer).
  gguf.py      `gguf` for `llama` / `llama_packed`: one .gguf (F32 or F16), llama.cpp's names.
The CLI is `cli.py` (`python -m kd_jax.export`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid

from kd_jax.errors import ConfigValueError, ExportWriteError
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
from kd_jax.export.source import load_student, stage_dirs
from kd_jax.models.llama_loading import llama_from_hf_state, load_hf_llama

check_formats()


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
    overwrite: bool = False,
    allow_unfinished: bool = False,
) -> dict:
    """Exports `stage`'s student from `workdir` to directory `out` -> {"format", "files",
    "stage", "step", "seed", "model", "notes"} ("notes": the warnings of the export, e.g. a BERT
    without a pooler). `dtype`: the stored weights' type (hf, gguf; GGUF keeps norms float32);
    `tokenizer`: a .gguf (llama) or HF tokenizer directory (bert) to take the tokenizer from,
    instead of the bundled teacher's when the vocabulary sizes match. `overwrite`: replace a
    non-empty `out`; `allow_unfinished`: export the newest checkpoint of an unfinished stage."""
    _check_format(format, dtype)
    check_out(out, overwrite)
    student = load_student(workdir, stage, seed=seed, step=step, allow_unfinished=allow_unfinished)
    notes: list[str] = []
    files = write_atomically(
        out,
        lambda tmp: export_student(
            student, tmp, format=format, dtype=dtype, tokenizer=tokenizer, notes=notes
        ),
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


def check_out(out: str, overwrite: bool) -> None:
    """`out` must be a directory path: absent, empty, or (with `overwrite`) replaceable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigValueError(f"--out={out} is a file; name a directory to export into.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigValueError(
            f"--out={out} is not empty ({len(os.listdir(out))} entries); pass --overwrite to "
            "replace it, or name another directory."
        )


def write_atomically(out: str, write) -> list[str]:
    """`write(tmp_dir) -> files` into a temporary directory beside `out`, then renamed to `out`
    (an existing `out` is moved aside first and removed after); -> the files under `out`. On
    any error the temporary directory is removed and `out` is left as it was."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=parent)
    try:
        files = write(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportWriteError(
                f"No space left on the device while writing the export for {out} ({e}); nothing "
                "was written. Free some space, or export to another --out."
            ) from e
        raise ExportWriteError(
            f"Cannot write the export for {out} ({e}); nothing was written."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(out):
        old = os.path.join(parent, f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [os.path.join(out, os.path.relpath(f, tmp)) for f in files]


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
    "check_out",
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
    "permute_qk",
    "stage_dirs",
    "supported_models",
    "write_gguf",
    "write_hf_bert",
    "write_hf_llama",
    "write_atomically",
    "write_npz",
]
