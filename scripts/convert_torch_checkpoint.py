"""Converts a PyTorch checkpoint (.pth / .bin / .pt state_dict) to .safetensors for kd_jax's
weight loaders (kd_jax.models.segformer_loading: `pretrained:mit:<file>`,
`pretrained:resnet18_v1b:<file>`). Uses torch here only; kd_jax itself never imports it.

    python scripts/convert_torch_checkpoint.py mit_b0.pth mit_b0.safetensors
    python scripts/convert_torch_checkpoint.py resnet18-imagenet.pth resnet18_v1b.safetensors

A checkpoint that wraps its weights ({"state_dict": ...}, {"model": ...}) is unwrapped; keys keep
their names (a "module." or "backbone." prefix is fine, the loaders find it). Non-tensor entries
are dropped; integer tensors (BN num_batches_tracked) are kept as they are.
"""

import argparse

import torch
from safetensors.torch import save_file


def state_dict(path: str) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SystemExit(f"'{path}' holds a {type(obj).__name__}, not a state_dict.")
    return {k: v.detach().contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="torch .pth / .bin / .pt state_dict")
    parser.add_argument("dst", help="output .safetensors")
    args = parser.parse_args()
    sd = state_dict(args.src)
    save_file(sd, args.dst)
    print(f"wrote {len(sd)} tensors to {args.dst}")


if __name__ == "__main__":
    main()
