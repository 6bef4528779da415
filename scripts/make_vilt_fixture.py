"""Regenerates tests/fixtures/vilt_tiny.safetensors + vilt_tiny_reference.npz.

A tiny *random* Hugging Face `ViltModel` (2 layers, hidden 32, 2 heads, MLP 64, vocab 100,
image 64, patch 16, torch seed 0; the [class] token, patch position embeddings and LayerNorm
affine params perturbed, which transformers initialises to zeros / ones, so the test sees their
layout) saved with `save_pretrained`, and one batch of three text + image pairs with its
`last_hidden_state` and `pooler_output` (eval mode, float32; ViLT has only eager attention):
  0: a 64x80 image, all pixels real (the 4x4 position grid is interpolated to 4x5);
  1: the same canvas with only the top-left 48x32 real (`pixel_mask`; grid 3x2 + padding);
  2: a 64x64 image padded to 64x80 (grid 4x4, no interpolation).
HF orders image tokens by its patch sampling (valid patches first, in random order when all are
valid), so the (row, col) of each image token is stored as `patch_index`: visual_embed is rerun
under the same torch seed as the forward pass (its only random draw is that sampling).

Needs torch + transformers (not kd_jax's dependencies):
    /tmp/torchenv/bin/python scripts/make_vilt_fixture.py
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers
from transformers import ViltConfig, ViltModel

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CONFIG = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    image_size=64,
    patch_size=16,
    num_channels=3,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SAMPLING_SEED = 1


def batch():
    rng = np.random.default_rng(0)
    input_ids = np.array(
        [
            [2, 17, 45, 9, 88, 31, 3, 0, 0, 0],
            [2, 5, 61, 3, 0, 0, 0, 0, 0, 0],
            [2, 70, 12, 12, 40, 99, 23, 54, 8, 3],
        ],
        np.int64,
    )
    attention_mask = (input_ids != 0).astype(np.int64)
    token_type_ids = np.zeros_like(input_ids)
    token_type_ids[2, 5:] = 1  # a second text segment
    pixel_values = rng.standard_normal((3, 3, 64, 80)).astype(np.float32)
    pixel_mask = np.ones((3, 64, 80), np.int64)
    pixel_mask[1, 48:, :] = 0
    pixel_mask[1, :, 32:] = 0
    pixel_mask[2, :, 64:] = 0
    pixel_values[pixel_mask[:, None].repeat(3, 1) == 0] = 0.0  # as ViltProcessor pads
    return input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask


def main():
    torch.manual_seed(0)
    config = ViltConfig(**CONFIG)
    model = ViltModel(config).eval()
    with torch.no_grad():
        emb = model.embeddings
        emb.cls_token.copy_(0.5 * torch.randn_like(emb.cls_token))
        emb.position_embeddings.copy_(0.5 * torch.randn_like(emb.position_embeddings))
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask, types, pixels, pmask = (torch.from_numpy(a) for a in batch())
    with torch.no_grad():
        torch.manual_seed(SAMPLING_SEED)
        _, image_mask, (patch_index, _) = model.embeddings.visual_embed(
            pixels, pmask, max_image_length=config.max_image_length
        )
        torch.manual_seed(SAMPLING_SEED)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=types,
            pixel_values=pixels,
            pixel_mask=pmask,
        )
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(OUT, "vilt_tiny.safetensors"))
    with open(os.path.join(tmp, "config.json")) as f:
        config_json = json.dumps(json.load(f))
    np.savez(
        os.path.join(OUT, "vilt_tiny_reference.npz"),
        input_ids=ids.numpy().astype(np.int32),
        attention_mask=mask.numpy().astype(np.int32),
        token_type_ids=types.numpy().astype(np.int32),
        pixel_values=pixels.numpy(),  # NCHW, as HF takes it
        pixel_mask=pmask.numpy().astype(np.int32),
        patch_index=patch_index.numpy().astype(np.int32),  # [B, N, 2] (row, col) per image token
        image_mask=image_mask.numpy().astype(np.int32),  # [B, 1 + N], HF's token order
        last_hidden_state=out.last_hidden_state.numpy(),
        pooler_output=out.pooler_output.numpy(),
        config_json=np.array(config_json),
        versions=np.array([torch.__version__, transformers.__version__]),
    )
    print(out.last_hidden_state.shape, out.pooler_output.shape, patch_index[0, :5].tolist())


if __name__ == "__main__":
    main()
