"""ImageNet-pretrained backbones from user-supplied files (nothing is downloaded).

`load_mit(path)`  a MiT (SegFormer encoder) .safetensors / .npz -> the params of
    `segformer.MixTransformer` (what sits under SegFormer's params["encoder"]). Two key namings:
    Hugging Face `Segformer*` (`[segformer.]encoder.patch_embeddings.{i}.proj.weight`,
    `encoder.block.{i}.{j}.attention.self.query`, ...; e.g. nvidia/mit-b0 model.safetensors) and
    NVlabs / mmseg `mit_b*.pth` (`[backbone.]patch_embed1.proj.weight`, `block1.0.attn.kv`, ...),
    the latter after `scripts/convert_torch_checkpoint.py` turned the .pth into .safetensors
    (also transformers >= 5's in-memory names, `stages.{i}.blocks.{j}.attention.q_proj`, ...).
`load_resnet18_v1b(path)`  a ResNet-18 v1b/v1c deep-stem state dict in the LAD / CIRKD naming
    (`conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`, `conv1.6`, `bn1`, `layer{l}.{k}.conv1`, ...) ->
    {"params", "batch_stats"} of `deeplab.ResNet18V1b` (DeepLabV3's params["backbone"]).

Classifier / decode-head / fc keys are ignored. Layouts: conv OIHW -> HWIO (depthwise [C,1,k,k]
-> [k,k,1,C], flax's feature_group_count layout), linear [out, in] -> [in, out], HF's separate
key / value -> our fused `kv` ([in, 2C], keys first).
"""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import load_file

from kd_jax.errors import (
    ConfigValueError,
    FileEntryError,
    UnsupportedFileError,
    UserFileNotFoundError,
    corrupt_file,
)
from kd_jax.models import segformer
from kd_jax.models.registry import WEIGHT_FILES, WeightFile


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors or .npz file as float32 numpy arrays."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"No weights file '{path}'.")
    if path.endswith(".safetensors"):
        try:
            raw = load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError for a bad file.
            raise corrupt_file(path, "safetensors weights", e) from e
    elif path.endswith(".npz"):
        try:
            with np.load(path) as f:
                raw = {k: f[k] for k in f.files}
        except Exception as e:  # BadZipFile, EOFError, ValueError...
            raise corrupt_file(path, "npz weights", e) from e
    else:
        raise UnsupportedFileError(
            f"'{path}': expected a .safetensors or .npz file (convert a torch .pth/.bin with "
            "scripts/convert_torch_checkpoint.py)."
        )
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}


def _prefix(tensors, anchor: str, path: str, what: str) -> str | None:
    hits = [k[: -len(anchor)] for k in tensors if k.endswith(anchor)]
    if len(hits) > 1:
        raise UnsupportedFileError(f"'{path}' holds several {what} ({hits}); keep one.")
    return hits[0] if hits else None


class _Reader:
    """Takes keys from the file, raising errors that name the key, the file and the shape."""

    def __init__(self, tensors, prefix: str, path: str):
        self.t, self.prefix, self.path = tensors, prefix, path

    def get(self, key: str, shape=None) -> np.ndarray:
        full = self.prefix + key
        if full not in self.t:
            want = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise FileEntryError(f"'{self.path}' has no tensor '{full}'{want}.")
        v = self.t[full]
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise UnsupportedFileError(
                f"'{self.path}': tensor '{full}' has shape {tuple(v.shape)}, expected "
                f"{tuple(shape)}."
            )
        return v

    def has(self, key: str) -> bool:
        return self.prefix + key in self.t


def _conv(w):  # OIHW -> HWIO
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _linear(w):  # [out, in] -> [in, out]
    return np.ascontiguousarray(w.T)


# --------------------------------------------------------------------------------------------
# MiT / SegFormer encoder


_HF = dict(
    anchor="encoder.patch_embeddings.0.proj.weight",
    embed="encoder.patch_embeddings.{i}.",
    embed_norm="layer_norm",
    block="encoder.block.{i}.{j}.",
    norm1="layer_norm_1",
    norm2="layer_norm_2",
    q="attention.self.query",
    sr="attention.self.sr",
    sr_norm="attention.self.layer_norm",
    proj="attention.output.dense",
    fc1="mlp.dense1",
    dwconv="mlp.dwconv.dwconv",
    fc2="mlp.dense2",
    stage_norm="encoder.layer_norm.{i}.",
    base=0,
    k="attention.self.key",
    v="attention.self.value",
)
# transformers >= 5 in memory (`model.state_dict()` saved with torch.save; save_pretrained and hub
# files use the names above).
_HF5 = dict(
    _HF,
    anchor="stages.0.patch_embeddings.proj.weight",
    embed="stages.{i}.patch_embeddings.",
    block="stages.{i}.blocks.{j}.",
    norm1="layernorm_before",
    norm2="layernorm_after",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    sr="attention.sequence_reduction.sequence_reduction",
    sr_norm="attention.sequence_reduction.layer_norm",
    proj="attention.o_proj",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    stage_norm="stages.{i}.layer_norm.",
)
_NV = dict(
    anchor="patch_embed1.proj.weight",
    embed="patch_embed{i}.",
    embed_norm="norm",
    block="block{i}.{j}.",
    norm1="norm1",
    norm2="norm2",
    q="attn.q",
    sr="attn.sr",
    sr_norm="attn.norm",
    proj="attn.proj",
    fc1="mlp.fc1",
    dwconv="mlp.dwconv.dwconv",
    fc2="mlp.fc2",
    stage_norm="norm{i}.",
    base=1,
)


def _mit_naming(tensors, path):
    for naming in (_HF, _HF5, _NV):
        prefix = _prefix(tensors, naming["anchor"], path, "MiT encoders")
        if prefix is not None:
            return naming, prefix
    raise UnsupportedFileError(
        f"'{path}' is not a MiT/SegFormer encoder: no key ends with "
        f"'{_HF['anchor']}' (Hugging Face) or '{_NV['anchor']}' (NVlabs/mmseg)."
    )


def mit_arch(path_or_tensors, path: str = "<tensors>") -> dict:
    """The encoder shape a MiT file holds: dims, depths, sr_ratios, mlp_ratios, and `variant`
    (the MIT_CONFIGS name with those dims/depths/mlp ratios, or None)."""
    if isinstance(path_or_tensors, str):
        path, tensors = path_or_tensors, read_tensors(path_or_tensors)
    else:
        tensors = path_or_tensors
    n, prefix = _mit_naming(tensors, path)
    r, b = _Reader(tensors, prefix, path), n["base"]
    dims, depths, srs, mlps = [], [], [], []
    for i in range(4):
        dims.append(int(r.get(n["embed"].format(i=i + b) + "proj.weight").shape[0]))
        depth = 0
        while r.has(n["block"].format(i=i + b, j=depth) + n["norm1"] + ".weight"):
            depth += 1
        depths.append(depth)
        blk = n["block"].format(i=i + b, j=0)
        srs.append(
            int(r.get(blk + n["sr"] + ".weight").shape[-1])
            if r.has(blk + n["sr"] + ".weight")
            else 1
        )
        mlps.append(int(r.get(blk + n["fc1"] + ".weight").shape[0]) // dims[-1])
    arch = dict(
        dims=tuple(dims), depths=tuple(depths), sr_ratios=tuple(srs), mlp_ratios=tuple(mlps)
    )
    arch["variant"] = next(
        (
            name
            for name, c in segformer.MIT_CONFIGS.items()
            if all(tuple(c[k]) == arch[k] for k in ("dims", "depths", "sr_ratios", "mlp_ratios"))
        ),
        None,
    )
    return arch


def load_mit(path: str, variant: str | None = None) -> dict:
    """-> MixTransformer params from a MiT .safetensors/.npz (HF or NVlabs naming). With
    `variant` ("b0".."b5", "pvt_v2_b*", "tiny") the file's dims/depths must be that variant's."""
    tensors = read_tensors(path)
    arch = mit_arch(tensors, path)
    if variant is not None:
        if variant not in segformer.MIT_CONFIGS:
            raise ConfigValueError(
                f"Unknown MiT variant '{variant}'; use one of {list(segformer.MIT_CONFIGS)}."
            )
        want = segformer.MIT_CONFIGS[variant]
        if any(tuple(want[k]) != arch[k] for k in ("dims", "depths", "mlp_ratios")):
            raise ConfigValueError(
                f"'{path}' holds a MiT with dims {arch['dims']}, depths {arch['depths']}, MLP "
                f"ratios {arch['mlp_ratios']} (variant {arch['variant']}), not '{variant}' "
                f"(dims {tuple(want['dims'])}, depths {tuple(want['depths'])})."
            )
    n, prefix = _mit_naming(tensors, path)
    r, b = _Reader(tensors, prefix, path), n["base"]

    def norm(key, c):
        return {"scale": r.get(key + ".weight", (c,)), "bias": r.get(key + ".bias", (c,))}

    def dense(key, c_in, c_out):
        return {
            "kernel": _linear(r.get(key + ".weight", (c_out, c_in))),
            "bias": r.get(key + ".bias", (c_out,)),
        }

    def conv(key, c_in, c_out, k):
        return {
            "kernel": _conv(r.get(key + ".weight", (c_out, c_in, k, k))),
            "bias": r.get(key + ".bias", (c_out,)),
        }

    params, c_prev = {}, 3
    for i in range(4):
        c, emb = arch["dims"][i], n["embed"].format(i=i + b)
        k = segformer.PATCH_KERNELS[i]
        params[f"patch_embed{i + 1}"] = {
            "proj": conv(emb + "proj", c_prev, c, k),
            "norm": norm(emb + n["embed_norm"], c),
        }
        hidden, sr = c * arch["mlp_ratios"][i], arch["sr_ratios"][i]
        for j in range(arch["depths"][i]):
            blk = n["block"].format(i=i + b, j=j)
            attn = {"q": dense(blk + n["q"], c, c)}
            if "k" in n:
                kk, vv = dense(blk + n["k"], c, c), dense(blk + n["v"], c, c)
                attn["kv"] = {
                    "kernel": np.concatenate([kk["kernel"], vv["kernel"]], axis=1),
                    "bias": np.concatenate([kk["bias"], vv["bias"]]),
                }
            else:
                attn["kv"] = dense(blk + "attn.kv", c, 2 * c)
            if sr > 1:
                attn["sr"] = conv(blk + n["sr"], c, c, sr)
                attn["norm"] = norm(blk + n["sr_norm"], c)
            attn["proj"] = dense(blk + n["proj"], c, c)
            params[f"block{i + 1}_{j}"] = {
                "norm1": norm(blk + n["norm1"], c),
                "attn": attn,
                "norm2": norm(blk + n["norm2"], c),
                "mlp": {
                    "fc1": dense(blk + n["fc1"], c, hidden),
                    "dwconv": conv(blk + n["dwconv"], 1, hidden, 3),
                    "fc2": dense(blk + n["fc2"], hidden, c),
                },
            }
        params[f"norm{i + 1}"] = norm(n["stage_norm"].format(i=i + b)[:-1], c)
        c_prev = c
    return params


# --------------------------------------------------------------------------------------------
# ResNet-18 v1b / v1c deep stem (LAD / CIRKD naming)


def load_resnet18_v1b(path: str, in_channels: int = 3, seed: int = 0) -> dict:
    """-> {"params", "batch_stats"} of `deeplab.ResNet18V1b` from a torch-named ResNet-18 v1b
    state dict (.safetensors/.npz). The stem widths come from the file ((32, 32, 64) for v1c,
    (64, 64, 128) for LAD's resnet18_v1s). `in_channels=4` builds LAD's label-assisted teacher
    stem: the ImageNet RGB filters in channels 0-2, channel 3 drawn as randn * 0.1 (`seed`)."""
    tensors = read_tensors(path)
    prefix = _prefix(tensors, "conv1.0.weight", path, "ResNet stems")
    if prefix is None:
        raise UnsupportedFileError(
            f"'{path}' is not a deep-stem ResNet v1b/v1c: no key ends with 'conv1.0.weight'."
        )
    r = _Reader(tensors, prefix, path)
    params, stats = {}, {}

    def conv(key, c_in, c_out, k):
        return {"kernel": _conv(r.get(key + ".weight", (c_out, c_in, k, k)))}

    def bn(p, s, name, key, c):
        p[name] = {
            "bn": {"scale": r.get(key + ".weight", (c,)), "bias": r.get(key + ".bias", (c,))}
        }
        s[name] = {
            "bn": {
                "mean": r.get(key + ".running_mean", (c,)),
                "var": r.get(key + ".running_var", (c,)),
            }
        }

    stem = [int(r.get(f"conv1.{t}.weight").shape[0]) for t in (0, 3, 6)]
    c_prev = 3
    for i, (ct, bt) in enumerate(((0, "conv1.1"), (3, "conv1.4"), (6, "bn1"))):
        params[f"stem_conv{i + 1}"] = conv(f"conv1.{ct}", c_prev, stem[i], 3)
        bn(params, stats, f"stem_bn{i + 1}", bt, stem[i])
        c_prev = stem[i]
    if in_channels != 3:
        w = params["stem_conv1"]["kernel"]
        extra = np.random.default_rng(seed).standard_normal(
            (*w.shape[:2], in_channels - 3, w.shape[3])
        )
        params["stem_conv1"]["kernel"] = np.concatenate([w, 0.1 * extra.astype(np.float32)], 2)
    for li in range(4):
        planes = int(r.get(f"layer{li + 1}.0.conv1.weight").shape[0])
        for k in range(2):
            key, p, s = f"layer{li + 1}.{k}.", {}, {}
            p["conv1"] = conv(key + "conv1", c_prev, planes, 3)
            bn(p, s, "bn1", key + "bn1", planes)
            p["conv2"] = conv(key + "conv2", planes, planes, 3)
            bn(p, s, "bn2", key + "bn2", planes)
            # ResNet18V1b's shortcut rule: a 1x1 conv where the width or the stride changes
            # (layer2's first block is the only strided one of the dilated backbone).
            if c_prev != planes or (li == 1 and k == 0):
                p["downsample"] = conv(key + "downsample.0", c_prev, planes, 1)
                bn(p, s, "downsample_bn", key + "downsample.1", planes)
            params[f"layer{li + 1}_{k}"], stats[f"layer{li + 1}_{k}"] = p, s
            c_prev = planes
    return {"params": params, "batch_stats": stats}


WEIGHT_FILES.register("mit", WeightFile(lambda path: {"params": load_mit(path)}))
WEIGHT_FILES.register("resnet18_v1b", WeightFile(load_resnet18_v1b))
