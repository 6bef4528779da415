"""`--format=hf` for BERT students: config.json (BertModel) + model.safetensors with Hugging Face
names (the inverse of `bert_loading.convert_hf_state`), the teacher's tokenizer files when the
student shares its vocabulary, and the sentence-transformers files (modules.json, mean pooling,
normalisation).

`bert` is the encoder itself. `bert_classifier` / `bert_qa` / `bert_mlm` export their encoder
(params["encoder"]); their task heads are left out, with a warning that names the dropped params.
The [CLS] pooler of a `bert_classifier` with `pooling="cls"` is HF's `pooler.dense` (tanh dense on
the first token) and is exported as it. Every other student has no pooler: transformers'
`BertModel` then initialises `pooler.dense` randomly, which the export warns of and records in
its notes (use mean pooling, i.e. the sentence-transformers files, or `last_hidden_state`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from kd_jax.errors import MissingPackageError, UserFileNotFoundError
from kd_jax.export.base import DTYPES, Student, flatten, log, register, warn, write_json
from kd_jax.models.bert import BertConfig
from kd_jax.models.bert_loading import EMBEDDINGS, LAYER
from kd_jax.tokenizers import find_minilm_l6

BERT_MODELS = ("bert", "bert_classifier", "bert_qa", "bert_mlm")
NO_POOLER = (
    "%s: %s has no pooler, so the export has no pooler.dense and transformers' BertModel "
    "initialises it randomly (its pooler_output is noise); use mean pooling (the "
    "sentence-transformers files) or last_hidden_state."
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def bert_hf_state(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
    """BertEncoder params -> HF BertModel state dict (the inverse of `convert_hf_state`)."""
    state = {}
    for hf_name, (module, leaf) in EMBEDDINGS.items():
        state[hf_name] = np.asarray(params[module][leaf], np.float32)
    for i in range(config.num_layers):
        layer = params[f"layer_{i}"]
        for hf_module, path in LAYER.items():
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


def pooler_hf_state(pooler: Mapping) -> dict[str, np.ndarray]:
    """A dense {"kernel", "bias"} on the [CLS] state -> HF's pooler.dense."""
    return {
        "pooler.dense.weight": np.ascontiguousarray(np.asarray(pooler["kernel"], np.float32).T),
        "pooler.dense.bias": np.asarray(pooler["bias"], np.float32),
    }


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


def _tokenizer_dir(tokenizer: str | None, vocab_size: int) -> str | None:
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
    out: str,
    config: BertConfig,
    params: Mapping,
    *,
    dtype="float32",
    tokenizer=None,
    pooler: Mapping | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """config.json + model.safetensors (BertModel; with `pooler`, a {"kernel", "bias"} dense, as
    its pooler.dense), tokenizer files and sentence-transformers files (modules.json,
    1_Pooling/config.json mean pooling, 2_Normalize). Warnings are appended to `notes`."""
    os.makedirs(out, exist_ok=True)
    state = bert_hf_state(params, config)
    if pooler is not None:
        state.update(pooler_hf_state(pooler))
    state = {k: v.astype(DTYPES[dtype]) for k, v in state.items()}
    weights = os.path.join(out, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    hf_config = dict(bert_hf_config(config), torch_dtype=dtype)
    files = [weights, write_json(os.path.join(out, "config.json"), hf_config)]
    source = _tokenizer_dir(tokenizer, config.vocab_size)
    if source is None:
        warn(
            notes,
            "no tokenizer with the student's vocabulary (%d) found; the export has no tokenizer "
            "files (pass --tokenizer=<HF tokenizer directory>).",
            config.vocab_size,
        )
    else:
        for name in _TOKENIZER_FILES:
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
        write_json(os.path.join(out, "modules.json"), modules),
        write_json(os.path.join(out, "1_Pooling", "config.json"), pooling),
        write_json(
            os.path.join(out, "sentence_bert_config.json"),
            {"max_seq_length": min(256, config.max_position), "do_lower_case": False},
        ),
    ]
    return files


@register("hf_bert", format="hf", models=BERT_MODELS)
def _write(student: Student, out: str, *, dtype, tokenizer, notes) -> list[str]:
    where = f"stage '{student.stage}'" if student.stage else "export"
    params = student.variables["params"]
    pooler = None
    if student.model != "bert":  # a head over params["encoder"]
        pooler = params.get("pooler")  # bert_classifier(pooling="cls"): HF's pooler.dense
        head = {k: v for k, v in params.items() if k not in ("encoder", "pooler")}
        dropped = ", ".join(f"{k} {list(v.shape)}" for k, v in flatten(head).items())
        warn(
            notes,
            "%s: exporting the encoder of %s as a HF BertModel; its task head is not included "
            "(dropped params: %s; use --format=npz for the whole model).",
            where,
            student.model,
            dropped or "none",
        )
        params = params["encoder"]
    if pooler is None:
        warn(notes, NO_POOLER, where, student.model)
    else:
        log.info("%s: the [CLS] pooler of %s is exported as pooler.dense.", where, student.model)
    config = student.module().config
    return write_hf_bert(
        out, config, params, dtype=dtype, tokenizer=tokenizer, pooler=pooler, notes=notes
    )
