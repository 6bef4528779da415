"""Writes tests/fixtures/qwen2_tiny.gguf: a tiny random Qwen2 model in GGUF (gguf.GGUFWriter).

2 layers, hidden 32, 4 query / 2 KV heads (head_dim 8), SwiGLU 64, q/k/v biases, untied output
head, RoPE theta 1e6 and RMSNorm eps 1e-6 in the metadata, float32 tensors. Its tokenizer is a
byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer "qwen2"): the 256 byte symbols, a few
merges, and ChatML control tokens. Tensors are stored in HF order (llama.cpp's Qwen2 converter
does not permute q/k rows). Nothing here is downloaded; the weights are drawn from `--seed`.

  python scripts/make_qwen2_fixture.py [--out tests/fixtures/qwen2_tiny.gguf] [--seed 0]

`tensors(seed)` and `write(path, seed)` are imported by tests/test_qwen2_gguf.py, which also
builds the file itself in a temporary directory (so the self-consistency test needs no committed
file) and checks kd_jax against a NumPy forward pass of the same tensors.
"""

from __future__ import annotations

import argparse
import os

import gguf
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "qwen2_tiny.gguf")
ARCH = dict(
    layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, rope_theta=1e6, eps=1e-6, context=2048
)
MERGES = ["Ġ t", "h e", "Ġt he", "e r", "i n", "a t", "Ġ s", "Ġs t"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in byte order (printable bytes stand for themselves, the others
    are shifted past 255), the alphabet of byte-level BPE."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def vocab() -> tuple[list[str], list[int]]:
    tokens = byte_symbols() + ["".join(m.split(" ")) for m in MERGES] + SPECIAL
    types = [1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL)
    return tokens, types


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array in NumPy [out, in] order}."""
    rng = np.random.default_rng(seed)
    v = len(vocab()[0])
    d, f = ARCH["hidden"], ARCH["ffn"]
    dh = d // ARCH["heads"]
    kv = ARCH["kv_heads"] * dh

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"token_embd.weight": w(v, d, scale=0.5), "output.weight": w(v, d)}
    out["output_norm.weight"] = (1 + w(d, scale=0.1)).astype(np.float32)
    for i in range(ARCH["layers"]):
        p = f"blk.{i}."
        out.update(
            {
                p + "attn_norm.weight": (1 + w(d, scale=0.1)).astype(np.float32),
                p + "attn_q.weight": w(d, d),
                p + "attn_q.bias": w(d, scale=0.5),
                p + "attn_k.weight": w(kv, d),
                p + "attn_k.bias": w(kv, scale=0.5),
                p + "attn_v.weight": w(kv, d),
                p + "attn_v.bias": w(kv, scale=0.5),
                p + "attn_output.weight": w(d, d),
                p + "ffn_norm.weight": (1 + w(d, scale=0.1)).astype(np.float32),
                p + "ffn_gate.weight": w(f, d),
                p + "ffn_up.weight": w(f, d),
                p + "ffn_down.weight": w(d, f),
            }
        )
    return out


def write(path: str = OUT, seed: int = 0) -> str:
    tokens, types = vocab()
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("qwen2-tiny-random")
    writer.add_block_count(ARCH["layers"])
    writer.add_context_length(ARCH["context"])
    writer.add_embedding_length(ARCH["hidden"])
    writer.add_feed_forward_length(ARCH["ffn"])
    writer.add_head_count(ARCH["heads"])
    writer.add_head_count_kv(ARCH["kv_heads"])
    writer.add_rope_freq_base(ARCH["rope_theta"])
    writer.add_layer_norm_rms_eps(ARCH["eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in tensors(seed).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write(args.out, args.seed), os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
    main()
