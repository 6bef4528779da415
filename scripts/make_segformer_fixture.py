"""Regenerates tests/fixtures/segformer_tiny.safetensors + segformer_tiny_reference.npz.

A tiny *random* Hugging Face `SegformerModel` (hidden sizes 8/16/24/32, one block per stage,
heads 1/1/2/2, sr ratios 8/4/2/1, MLP ratio 2, seed 0) saved with `save_pretrained` (the legacy
`encoder.patch_embeddings.{i}...` key names that hub checkpoints such as nvidia/mit-b0 use), and
one 64x64 input with the four stage outputs (NCHW, after each stage's LayerNorm).

Needs torch + transformers (not kd_jax's dependencies):
    /tmp/torchenv/bin/python scripts/make_segformer_fixture.py
"""

import os
import shutil
import tempfile

import numpy as np
import torch
from transformers import SegformerConfig, SegformerModel

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CONFIG = dict(
    num_channels=3,
    num_encoder_blocks=4,
    depths=[1, 1, 1, 1],
    sr_ratios=[8, 4, 2, 1],
    hidden_sizes=[8, 16, 24, 32],
    num_attention_heads=[1, 1, 2, 2],
    mlp_ratios=[2, 2, 2, 2],
    patch_sizes=[7, 3, 3, 3],
    strides=[4, 2, 2, 2],
)


def main():
    torch.manual_seed(0)
    model = SegformerModel(SegformerConfig(**CONFIG)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params, so the test sees their layout.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64), np.float32))
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    shutil.copy(
        os.path.join(tmp, "model.safetensors"), os.path.join(OUT, "segformer_tiny.safetensors")
    )
    stages = {f"stage{i + 1}": h.numpy() for i, h in enumerate(out.hidden_states)}
    np.savez(os.path.join(OUT, "segformer_tiny_reference.npz"), pixel_values=x.numpy(), **stages)
    print({k: v.shape for k, v in stages.items()})


if __name__ == "__main__":
    main()
