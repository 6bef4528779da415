"""Export a distilled student to the formats people deploy.

    python -m kd_jax.export --workdir=W --stage=S [--seed=i] [--step=N] --format=hf|gguf|npz \
        --out=DIR [--dtype=float32|float16] [--tokenizer=PATH]

or `kd_jax.export.export(workdir, stage, out=..., format=...)` in a notebook. The stage's final
(or `step`) checkpoint is read with the config saved in its metadata (no data, teacher or
optimizer is built); one seed replica is taken and everything that is not the student (the
adapters under params["aux"], the optimizer state) is left out.

Formats:
  hf    `bert` students (and the encoder of `bert_classifier` / `bert_qa` / `bert_mlm`): config.json
        (BertModel) + model.safetensors with Hugging Face names (the inverse of
        `bert_loading.convert_hf_state`), the teacher's tokenizer files when the student shares
        its vocabulary, and the sentence-transformers files (modules.json, mean pooling,
        normalisation). `llama` / `llama_packed` students: config.json (LlamaForCausalLM) +
        model.safetensors (+ tokenizer.json when the vocabulary is SmolLM2's).
  gguf  `llama` / `llama_packed` students: one .gguf (F32 or F16) with llama.cpp's names and its
        Q/K row order, and the tokenizer metadata of the student's vocabulary.
  npz   any registered model: variables.npz (params + batch_stats, "/"-joined paths) and
        architecture.json {model, kwargs, dtype}; `load_npz(dir)` -> (module, variables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import types
from collections.abc import Mapping

import jax
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from safetensors.numpy import load_file, save_file

from kd_jax import checkpoint as ckpt_lib
from kd_jax import models, sharding
from kd_jax import teacher as teacher_lib
from kd_jax.errors import (
    ConfigValueError,
    MissingPackageError,
    UserError,
    UserFileNotFoundError,
    corrupt_file,
)
from kd_jax.models.bert import BertConfig
from kd_jax.models.bert_loading import _EMBEDDINGS, _LAYER
from kd_jax.models.llama import LlamaConfig
from kd_jax.tokenizers import BPETokenizer, find_minilm_l6, find_smollm2_gguf, gguf_reader

log = logging.getLogger("kd_jax")

FORMATS = ("hf", "gguf", "npz")
DTYPES = {"float32": np.float32, "float16": np.float16}
BERT_MODELS = ("bert", "bert_classifier", "bert_qa", "bert_mlm")  # for messages
LLAMA_MODELS = ("llama", "llama_packed")
ARCHITECTURE_FILE = "architecture.json"
VARIABLES_FILE = "variables.npz"
GGUF_FILE = "model.gguf"


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
        return models.build(_model_cfg(self.model, self.kwargs), dtype=self.dtype)


def _model_cfg(model: str, kwargs: Mapping):
    return types.SimpleNamespace(model=model, kwargs=_tuples(dict(kwargs)))


def _tuples(x):
    """JSON lists back to the tuples a config had (model fields such as widths)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


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
    rules = types.SimpleNamespace(sharding_rules=((".*", "replicate"),))
    variables, got = teacher_lib.stage_student(rules, _one_device_mesh(), dirs[stage], step)
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
    "seed", "model"}. `dtype`: the stored weights' type (hf, gguf; GGUF keeps norms float32);
    `tokenizer`: a .gguf (llama) or HF tokenizer directory (bert) to take the tokenizer from,
    instead of the bundled teacher's when the vocabulary sizes match."""
    _check_format(format, dtype)
    student = load_student(workdir, stage, seed=seed, step=step)
    files = export_student(student, out, format=format, dtype=dtype, tokenizer=tokenizer)
    return {
        "format": format,
        "files": files,
        "stage": student.stage,
        "step": student.step,
        "seed": student.seed,
        "model": student.model,
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
) -> list[str]:
    """Writes `student` to directory `out` in `format`; returns the files written."""
    _check_format(format, dtype)
    where = f"stage '{student.stage}' " if student.stage else ""
    if format == "npz":
        return write_npz(out, student)
    module = student.module()
    # Any BERT-encoder model (its module has a BertConfig): "bert", or a head over "encoder".
    if format == "hf" and isinstance(getattr(module, "config", None), BertConfig):
        params = student.variables["params"]
        if student.model != "bert":
            log.warning(
                "%s: exporting the encoder of %s as a HF BertModel; its task head is not included "
                "(use --format=npz for the whole model).",
                where or "export",
                student.model,
            )
            params = params["encoder"]
        return write_hf_bert(out, module.config, params, dtype=dtype, tokenizer=tokenizer)
    if student.model in LLAMA_MODELS:
        params = student.variables["params"]
        if format == "hf":
            return write_hf_llama(out, module.config, params, dtype=dtype, tokenizer=tokenizer)
        return write_gguf(
            os.path.join(out, GGUF_FILE), module.config, params, dtype=dtype, tokenizer=tokenizer
        )
    supported = BERT_MODELS + LLAMA_MODELS if format == "hf" else LLAMA_MODELS
    raise ConfigValueError(
        f"{where}student model '{student.model}' cannot be exported as '{format}' (that format "
        f"supports {list(supported)}); use --format=npz."
    )


# ----------------------------------------------------------------------------- npz
def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
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
    arrays = _flatten(student.variables)
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
    _write_json(arch, record)
    return [path, arch]


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
    module = models.build(
        _model_cfg(record["model"], record.get("kwargs") or {}),
        dtype=record.get("dtype", "float32"),
    )
    return module, _unflatten(flat)


# ----------------------------------------------------------------------------- HF BERT
def bert_hf_state(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
    """BertEncoder params -> HF BertModel state dict (the inverse of `convert_hf_state`)."""
    state = {}
    for hf_name, (module, leaf) in _EMBEDDINGS.items():
        state[hf_name] = np.asarray(params[module][leaf], np.float32)
    for i in range(config.num_layers):
        layer = params[f"layer_{i}"]
        for hf_module, path in _LAYER.items():
            node = layer
            for part in path:
                node = node[part]
            prefix = f"encoder.layer.{i}.{hf_module}"
            if path[-1] == "LayerNorm":
                state[f"{prefix}.weight"] = np.asarray(node["scale"], np.float32)
            else:
                state[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(node["kernel"]).T)
            state[f"{prefix}.bias"] = np.asarray(node["bias"], np.float32)
    return state


def bert_hf_config(config: BertConfig) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


_BERT_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def _bert_tokenizer_dir(tokenizer: str | None, vocab_size: int) -> str | None:
    """The directory to copy tokenizer files from: `tokenizer`, else the bundled all-MiniLM-L6-v2
    when its vocabulary has the student's size."""
    if tokenizer:
        if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
            raise UserFileNotFoundError(f"--tokenizer={tokenizer} has no tokenizer.json.")
        return tokenizer
    try:
        path = find_minilm_l6()
    except MissingPackageError:
        return None
    with open(os.path.join(path, "config.json")) as f:
        teacher_vocab = json.load(f)["vocab_size"]
    return path if teacher_vocab == vocab_size else None


def write_hf_bert(
    out: str, config: BertConfig, params: Mapping, *, dtype="float32", tokenizer=None
) -> list[str]:
    """config.json + model.safetensors (BertModel), tokenizer files and sentence-transformers
    files (modules.json, 1_Pooling/config.json mean pooling, 2_Normalize)."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.astype(DTYPES[dtype]) for k, v in bert_hf_state(params, config).items()}
    weights = os.path.join(out, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    hf_config = dict(bert_hf_config(config), torch_dtype=dtype)
    files = [weights, _write_json(os.path.join(out, "config.json"), hf_config)]
    source = _bert_tokenizer_dir(tokenizer, config.vocab_size)
    if source is None:
        log.warning(
            "no tokenizer with the student's vocabulary (%d) found; the export has no tokenizer "
            "files (pass --tokenizer=<HF tokenizer directory>).",
            config.vocab_size,
        )
    else:
        for name in _BERT_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                files.append(shutil.copy(os.path.join(source, name), os.path.join(out, name)))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    files += [
        _write_json(os.path.join(out, "modules.json"), modules),
        _write_json(os.path.join(out, "1_Pooling", "config.json"), pooling),
        _write_json(
            os.path.join(out, "sentence_bert_config.json"),
            {"max_seq_length": min(256, config.max_position), "do_lower_case": False},
        ),
    ]
    return files


# ----------------------------------------------------------------------------- HF Llama
_LLAMA_BLOCK = {  # our scanned module under "layers" -> HF name under model.layers.{i}
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def llama_hf_state(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Llama params -> HF LlamaForCausalLM state dict. kd_jax's Q/K rows are already in HF's
    `rotate_half` order (the GGUF loader un-permutes llama.cpp's), so they are written as is."""
    state = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"])}
    for ours, hf in _LLAMA_BLOCK.items():
        leaf = "scale" if ours.endswith("norm") else "kernel"
        stacked = np.asarray(params["layers"][ours][leaf])
        for i in range(config.num_layers):
            value = stacked[i] if leaf == "scale" else stacked[i].T
            state[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(value)
    state["model.norm.weight"] = np.asarray(params["norm"]["scale"])
    if not config.tie_embeddings:
        state["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return {k: v.astype(np.float32) for k, v in state.items()}


def llama_from_hf_state(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict:
    """The inverse of `llama_hf_state` -> {"params": ...} for `Llama(config)`."""
    layers = {}
    for ours, hf in _LLAMA_BLOCK.items():
        leaf = "scale" if ours.endswith("norm") else "kernel"
        per_layer = []
        for i in range(config.num_layers):
            value = np.asarray(state[f"model.layers.{i}.{hf}.weight"], np.float32)
            per_layer.append(value if leaf == "scale" else value.T)
        layers[ours] = {leaf: np.ascontiguousarray(np.stack(per_layer))}
    params = {
        "embed_tokens": {"embedding": np.asarray(state["model.embed_tokens.weight"], np.float32)},
        "layers": layers,
        "norm": {"scale": np.asarray(state["model.norm.weight"], np.float32)},
    }
    if not config.tie_embeddings:
        lm_head = np.asarray(state["lm_head.weight"], np.float32)
        params["lm_head"] = {"kernel": np.ascontiguousarray(lm_head.T)}
    return {"params": params}


def llama_hf_config(config: LlamaConfig, special: Mapping[str, int] | None = None) -> dict:
    special = dict(special or {})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": "float32",
    }


def _llama_config_from_hf(hf: Mapping) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
    )


def load_hf_llama(directory: str) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, {"params": ...} float32) from a directory written by `write_hf_llama` (or any
    HF Llama directory with one model.safetensors)."""
    config_path = os.path.join(str(directory), "config.json")
    weights = os.path.join(str(directory), "model.safetensors")
    for f in (config_path, weights):
        if not os.path.isfile(f):
            raise UserFileNotFoundError(f"No {os.path.basename(f)} in {directory}.")
    with open(config_path) as f:
        config = _llama_config_from_hf(json.load(f))
    return config, llama_from_hf_state(load_file(weights), config)


def _llama_tokenizer_gguf(tokenizer: str | None, vocab_size: int) -> str | None:
    """A .gguf to take the tokenizer from: `tokenizer`, else the bundled SmolLM2 when its
    vocabulary has the student's size."""
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise UserFileNotFoundError(f"--tokenizer={tokenizer}: no such .gguf file.")
        return tokenizer
    try:
        path = find_smollm2_gguf()
    except MissingPackageError:
        return None
    tokens = gguf_reader(path).fields.get("tokenizer.ggml.tokens")
    return path if tokens is not None and len(tokens.data) == vocab_size else None


def write_hf_llama(
    out: str, config: LlamaConfig, params: Mapping, *, dtype="float32", tokenizer=None
) -> list[str]:
    """config.json (LlamaForCausalLM) + model.safetensors (+ tokenizer.json,
    tokenizer_config.json when the student's vocabulary has a known tokenizer)."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.astype(DTYPES[dtype]) for k, v in llama_hf_state(params, config).items()}
    weights = os.path.join(out, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    source = _llama_tokenizer_gguf(tokenizer, config.vocab_size)
    files = [weights]
    special: dict = {}
    if source is None:
        log.warning(
            "no tokenizer with the student's vocabulary (%d) found; the export has no tokenizer "
            "files (pass --tokenizer=<a .gguf with that vocabulary>).",
            config.vocab_size,
        )
    else:
        tok = BPETokenizer.from_gguf(source)
        special = tok.special
        path = os.path.join(out, "tokenizer.json")
        tok._tok.save(path)

        def token(name):
            i = special.get(name)
            return None if i is None else tok._tok.id_to_token(i)

        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("pad"),
            "unk_token": token("unk"),
            "add_bos_token": False,
            "model_max_length": config.max_position,
            "chat_template": tok.chat_template,
        }
        files += [path, _write_json(os.path.join(out, "tokenizer_config.json"), tok_config)]
    hf_config = dict(llama_hf_config(config, special), torch_dtype=dtype)
    files.append(_write_json(os.path.join(out, "config.json"), hf_config))
    return files


# ----------------------------------------------------------------------------- GGUF
def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF [out, in] Q/K rows -> llama.cpp's interleaved order (`gguf_loading.unpermute_qk`'s
    inverse): each head's [first half | second half] rows become adjacent pairs."""
    out = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, out // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_BLOCK = {  # our module under "layers" -> llama.cpp tensor blk.{i}.<name>.weight
    "attn_norm": "attn_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "mlp_norm": "ffn_norm",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def gguf_tensors(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Llama params -> {llama.cpp tensor name: float32 [out, in] array} (Q/K permuted)."""
    tensors = {"token_embd.weight": np.asarray(params["embed_tokens"]["embedding"])}
    for ours, name in _GGUF_BLOCK.items():
        leaf = "scale" if ours.endswith("norm") else "kernel"
        stacked = np.asarray(params["layers"][ours][leaf])
        for i in range(config.num_layers):
            value = stacked[i] if leaf == "scale" else stacked[i].T
            if ours == "q_proj":
                value = permute_qk(value, config.num_heads)
            elif ours == "k_proj":
                value = permute_qk(value, config.num_kv_heads)
            tensors[f"blk.{i}.{name}.weight"] = np.ascontiguousarray(value)
    tensors["output_norm.weight"] = np.asarray(params["norm"]["scale"])
    if not config.tie_embeddings:
        tensors["output.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def write_gguf(
    path: str, config: LlamaConfig, params: Mapping, *, dtype="float32", tokenizer=None, name=""
) -> list[str]:
    """One llama-architecture .gguf: F32, or F16 with norms kept F32 (llama.cpp's convention),
    with the tokenizer metadata (tokenizer.*) of the .gguf whose vocabulary the student uses."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_name(name or "kd_jax student")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    f16 = dtype == "float16"
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if f16 else LlamaFileType.ALL_F32)
    source = _llama_tokenizer_gguf(tokenizer, config.vocab_size)
    if source is None:
        log.warning(
            "no tokenizer with the student's vocabulary (%d) found; the .gguf has no tokenizer "
            "metadata (pass --tokenizer=<a .gguf with that vocabulary>); llama.cpp needs one.",
            config.vocab_size,
        )
    else:
        for key, field in gguf_reader(source).fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[-1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub)
    for tensor_name, value in gguf_tensors(params, config).items():
        if f16 and value.ndim > 1:
            writer.add_tensor(tensor_name, value.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, value, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]


# ----------------------------------------------------------------------------- helpers, CLI
def _write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return path


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m kd_jax.export", description="Export a distilled student."
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", default=None, help="stage name (default: the only one)")
    p.add_argument("--seed", type=int, default=0, help="seed replica index")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: final)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokenizer", default=None, help="a .gguf or HF tokenizer directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        res = export(
            args.workdir,
            args.stage,
            out=args.out,
            format=args.format,
            seed=args.seed,
            step=args.step,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
        )
    except UserError as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kd_jax export error: {msg}", file=sys.stderr)
        return 2
    print(
        f"exported stage '{res['stage']}' step {res['step']} seed {res['seed']} "
        f"({res['model']}, {res['format']}) to {args.out}:"
    )
    for f in res["files"]:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
