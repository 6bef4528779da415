"""ViLT (Kim et al., ICML 2021, arXiv:2102.03334) in Flax linen, matching HF `ViltModel`.

One transformer reads text and image together (Sec. 3.1, Eq. 1-6 of the paper): BERT-style
text embeddings (word + position + segment, LayerNorm), 32x32 patch embeddings of the image with
a [class] token and learned position embeddings bilinearly interpolated to the image's patch
grid, a modality-type embedding added to every token (0 text, 1 image), then pre-LayerNorm
ViT-style blocks, a final LayerNorm and a tanh pooler on the first (text [CLS]) token.

Layout: `pixel_values` is NHWC (kd_jax's image convention; transpose HF's NCHW), `pixel_mask`
[B, H, W] (1 = real pixel, as ViltProcessor pads a batch to its largest image). The blocks run
under `nn.scan`, so every block parameter has a leading layer axis [L, ...]
(`kd_jax.models.vilt_loading` stacks HF checkpoints that way).

Image tokens: by default every patch is kept, in row-major order, and patches outside the
downsampled pixel mask are masked out of attention. HF instead gathers the valid patches first
(in random order when all are valid) and pads with masked patches; attention is permutation
equivariant, so the pooled output and every valid token's state are the same. With
`max_image_length > 0` (the paper's patch sampling, Sec. 3.1: 200 patches at pre-training),
`max_image_length` patches are kept per image, valid ones first: a random subset when training
(rng stream "dropout"), the first valid patches in row-major order otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.models.bert import MASK_VALUE, _dense, hf_encoder_fields, read_hf_json
from kd_jax.models.registry import preset_fields, register


@dataclasses.dataclass(frozen=True)
class ViltConfig:
    """Shape of a ViLT encoder; defaults are ViLT-B/32 (dandelin/vilt-b32-mlm)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 40  # text tokens
    type_vocab_size: int = 2  # text segments
    modality_type_vocab_size: int = 2  # 0 text, 1 image (2: a second image, NLVR2)
    image_size: int = 384  # the position-embedding grid is image_size // patch_size square
    patch_size: int = 32
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-12
    max_image_length: int = -1  # > 0: keep this many patches per image (see module docstring)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if self.image_size % self.patch_size:
            raise ConfigValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Side of the square grid of learned patch position embeddings."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_json(cls, path, **overrides) -> ViltConfig:
        """Reads a Hugging Face ViLT `config.json` (file path, or a directory containing it)."""
        hf = read_hf_json(path, "vilt")
        max_image_length = hf.get("max_image_length", -1)
        fields = dict(
            hf_encoder_fields(hf, dropout=0.0),
            modality_type_vocab_size=hf.get("modality_type_vocab_size", 2),
            image_size=hf.get("image_size", 384),
            patch_size=hf.get("patch_size", 32),
            num_channels=hf.get("num_channels", 3),
            qkv_bias=hf.get("qkv_bias", True),
            max_image_length=-1 if max_image_length is None else int(max_image_length),
        )
        fields.update(overrides)
        return cls(**fields)


# Architecture presets for `preset=` (no weights ship with kd_jax: load users' HF checkpoints
# with `pretrained="hf_vilt:/dir"`, whose config.json then fills the architecture).
VILT_PRESETS = {
    "vilt-b32": {},  # ViltConfig's defaults: 12 x 768, 12 heads, patch 32, image 384
}


def _ln(cfg: ViltConfig, name: str) -> nn.LayerNorm:
    # Statistics in float32 even for bf16 compute: eps 1e-12 is below bf16 resolution.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch `interpolate(mode="nearest")` source rows: floor(i * in/out), float32 scale."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale), n_in - 1).astype(int)


def _align_corners_weights(valid, n_out: int, n_in: int):
    """[B, n_out, n_in] bilinear weights (align_corners=True) resizing n_in rows to `valid[b]`
    rows; output rows at or beyond `valid[b]` are all zero (HF pads the resized grid with 0)."""
    valid = valid.astype(jnp.float32)[:, None]  # [B, 1]
    i = jnp.arange(n_out, dtype=jnp.float32)[None, :]  # [1, n_out]
    scale = jnp.where(valid > 1, (n_in - 1) / jnp.maximum(valid - 1, 1), 0.0)
    src = i * scale
    lo = jnp.floor(src)
    frac = src - lo
    hi = jnp.minimum(lo + 1, n_in - 1)
    cols = jnp.arange(n_in, dtype=jnp.float32)[None, None, :]
    w = (1 - frac)[..., None] * (cols == lo[..., None]) + frac[..., None] * (cols == hi[..., None])
    return w * (i < valid)[..., None]


class ViltTextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + segment, then LayerNorm (HF `TextEmbeddings`)."""

    config: ViltConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        cfg = self.config
        init = nn.initializers.normal(0.02)

        def table(n, name):
            return nn.Embed(n, cfg.hidden_size, embedding_init=init, name=name)

        t = input_ids.shape[1]
        x = (
            table(cfg.vocab_size, "word_embeddings")(input_ids)
            + table(cfg.max_position, "position_embeddings")(jnp.arange(t)[None, :])
            + table(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        return _ln(cfg, "LayerNorm")(x)


class ViltEmbeddings(nn.Module):
    """Text and image tokens with their modality embeddings (HF `ViltEmbeddings`).

    Returns (text [B, T, D], image [B, 1 + N, D], image_mask [B, 1 + N] int32)."""

    config: ViltConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        token_type_ids,
        pixel_values,
        pixel_mask,
        image_token_type_idx: int,
        *,
        train: bool,
    ):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        drop = nn.Dropout(cfg.hidden_dropout, deterministic=not train)

        text = ViltTextEmbeddings(cfg, name="text_embeddings")(input_ids, token_type_ids)
        text = drop(text)

        # Image: non-overlapping patch projection, NHWC.
        pixel_values = jnp.asarray(pixel_values, self.dtype)
        x = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=init,
            name="patch_embeddings",
        )(pixel_values)
        b, gh, gw, d = x.shape
        h_in, w_in = pixel_values.shape[1:3]
        mask = jnp.asarray(pixel_mask)[:, _nearest_index(h_in, gh)][:, :, _nearest_index(w_in, gw)]
        mask = (mask > 0).astype(jnp.int32)  # [B, gh, gw]
        valid_h = jnp.sum(mask[:, :, 0], axis=1)  # rows of real image (first column)
        valid_w = jnp.sum(mask[:, 0, :], axis=1)

        pos_table = self.param("position_embeddings", init, (1, cfg.grid**2 + 1, d))
        cls_token = self.param("cls_token", init, (1, 1, d))
        spatial = pos_table[0, 1:].reshape(cfg.grid, cfg.grid, d)
        wy = _align_corners_weights(valid_h, gh, cfg.grid)  # [B, gh, grid]
        wx = _align_corners_weights(valid_w, gw, cfg.grid)  # [B, gw, grid]
        pos = jnp.einsum("bip,pqd,bjq->bijd", wy, spatial, wx, precision=jax.lax.Precision.HIGHEST)

        x = x.reshape(b, gh * gw, d)
        pos = pos.reshape(b, gh * gw, d)
        mask = mask.reshape(b, gh * gw)
        if cfg.max_image_length > 0 and cfg.max_image_length < gh * gw:
            x, pos, mask = _select_patches(
                x, pos, mask, cfg.max_image_length, self.make_rng("dropout") if train else None
            )
        image = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)).astype(x.dtype), x], 1)
        pos = jnp.concatenate([jnp.broadcast_to(pos_table[:, :1], (b, 1, d)), pos], 1)
        image = drop(image + pos.astype(image.dtype))
        image_mask = jnp.concatenate([jnp.ones((b, 1), jnp.int32), mask], axis=1)

        modality = nn.Embed(
            cfg.modality_type_vocab_size, d, embedding_init=init, name="token_type_embeddings"
        )
        text = text + modality(jnp.zeros((1, 1), jnp.int32))
        image = image + modality(jnp.full((1, 1), image_token_type_idx, jnp.int32))
        return text.astype(self.dtype), image.astype(self.dtype), image_mask


def _select_patches(x, pos, mask, k: int, rng):
    """Keeps k patches per image, valid ones first (random among them if `rng`, else the first
    in row-major order), as HF's `max_image_length` sampling does."""
    n = x.shape[1]
    order = jnp.arange(n, dtype=jnp.float32) / n  # < 1: ties broken by position
    tie = order[None, :] if rng is None else jax.random.uniform(rng, mask.shape)
    _, idx = jax.lax.top_k(mask.astype(jnp.float32) * 2 - tie, k)

    def take(a):
        return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    return take(x), take(pos), take(mask)


class ViltLayer(nn.Module):
    """One pre-LN block (HF `ViltLayer`): x + Attn(LN(x)), then h + MLP(LN(h)); scanned."""

    config: ViltConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, additive_mask):
        cfg = self.config
        b, s, _ = x.shape
        drop = nn.Dropout(cfg.hidden_dropout, deterministic=self.deterministic)
        y = _ln(cfg, "layernorm_before")(x).astype(self.dtype)

        def proj(name, bias=True):
            return nn.Dense(
                cfg.hidden_size,
                use_bias=bias,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(0.02),
                name=name,
            )

        def heads(z):  # [B, S, D] -> [B, H, S, d]
            return z.reshape(b, s, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)

        q, k, v = (heads(proj(n, cfg.qkv_bias)(y)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / np.sqrt(cfg.head_dim) + additive_mask, axis=-1)
        probs = nn.Dropout(cfg.attention_dropout, deterministic=self.deterministic)(probs)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, cfg.hidden_size)
        h = x + drop(proj("attention_output")(ctx))

        y = _ln(cfg, "layernorm_after")(h).astype(self.dtype)
        y = nn.gelu(_dense(cfg.intermediate_size, "intermediate", self.dtype)(y), approximate=False)
        out = h + drop(_dense(cfg.hidden_size, "output", self.dtype)(y))
        return out, out


class ViltModel(nn.Module):
    """ViLT encoder + pooler; returns `(pooled [B, D], features)`.

    Args (to `__call__`):
      input_ids: int [B, T], T <= max_position (40 for ViLT-B/32).
      attention_mask: 0/1 [B, T] (1 = real token); None = all ones.
      pixel_values: float [B, H, W, C] (NHWC), normalised as ViltProcessor does (mean = std =
        0.5); H and W need not equal image_size (position embeddings are interpolated).
      pixel_mask: 0/1 [B, H, W] (1 = real pixel); None = all ones.
      token_type_ids: optional int [B, T] text segments (default zeros).
      image_token_type_idx: the modality id of the image tokens (1; 2 for a second image).
      train: enables dropout (needs a 'dropout' rng; ViLT-B/32's dropout rates are 0).

    Features: "last_hidden_state" [B, T + 1 + N, D] after the final LayerNorm (text tokens,
    then the image [class] token, then N patches), "text_hidden" [B, T, D], "image_hidden"
    [B, 1 + N, D], "text_mask" [B, T], "image_mask" [B, 1 + N], "mask" [B, T + 1 + N] (int32,
    1 = attended), "embeddings" [B, T + 1 + N, D], "layer_{i}" = {"hidden": block i's output
    (before the final LayerNorm)}, "pooled" and "logits" (both = pooled: tanh(W h_[CLS] + b)).

    `dtype` (if given) overrides `config.dtype` as the compute dtype; params are float32;
    LayerNorms, attention logits and softmax are float32.
    """

    config: ViltConfig
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        pixel_mask=None,
        token_type_ids=None,
        *,
        image_token_type_idx: int = 1,
        train: bool = False,
    ):
        cfg = self.config
        dtype = self.dtype if self.dtype is not None else cfg.dtype
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if t > cfg.max_position:
            raise ConfigValueError(
                f"{t} text tokens exceed max_position {cfg.max_position}; truncate the text "
                f"(ViltProcessor: max_length={cfg.max_position}, truncation=True)."
            )
        if pixel_values is None:
            raise ConfigValueError(
                "ViLT needs pixel_values [B, H, W, C] (NHWC): use data with an image input."
            )
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ConfigValueError(
                f"pixel_values must be NHWC with {cfg.num_channels} channels, got shape "
                f"{pixel_values.shape} (transpose HF's NCHW with .transpose(0, 2, 3, 1))."
            )
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if pixel_mask is None:
            pixel_mask = jnp.ones(pixel_values.shape[:3], jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        text_mask = jnp.asarray(attention_mask).astype(jnp.int32)

        text, image, image_mask = ViltEmbeddings(cfg, dtype, name="embeddings")(
            input_ids, token_type_ids, pixel_values, pixel_mask, image_token_type_idx, train=train
        )
        x = jnp.concatenate([text, image], axis=1)
        mask = jnp.concatenate([text_mask, image_mask], axis=1)
        additive = jnp.where(mask[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(jnp.float32)

        layers = nn.scan(
            ViltLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=cfg.num_layers,
        )(cfg, dtype, not train, name="layers")
        h, per_layer = layers(x, additive)
        last = _ln(cfg, "layernorm")(h).astype(dtype)
        pooled = jnp.tanh(_dense(cfg.hidden_size, "pooler", dtype)(last[:, 0]))

        feats: dict[str, Any] = {
            "embeddings": x,
            "last_hidden_state": last,
            "text_hidden": last[:, :t],
            "image_hidden": last[:, t:],
            "text_mask": text_mask,
            "image_mask": image_mask,
            "mask": mask,
        }
        for i in range(cfg.num_layers):
            feats[f"layer_{i}"] = {"hidden": per_layer[i]}
        feats["pooled"] = pooled
        feats["logits"] = pooled
        return pooled, feats


def pixels_from_image(image):
    """Images in [0, 1] (kd_jax's "image" key, NHWC) -> ViLT's `pixel_values`: ViltProcessor's
    normalisation, (x - 0.5) / 0.5 per channel. (The processor also resizes the shorter side to
    384 and pads a batch to its largest image with `pixel_mask`; sources that emit fixed-size
    crops skip both, and the interpolated position embeddings take any size.)"""
    return (jnp.asarray(image, jnp.float32) - 0.5) / 0.5


def vilt_config(preset: str = "vilt-b32", **kwargs) -> ViltConfig:
    """A ViltConfig from a preset name ("vilt-b32") or a checkpoint ("hf_vilt:/dir"), with
    kwargs overriding its fields."""
    if preset in VILT_PRESETS:
        fields = dict(VILT_PRESETS[preset])
    elif preset:
        fields = preset_fields(preset)
    else:
        fields = {}
    known = {f.name for f in dataclasses.fields(ViltConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigValueError(
            f"ViLT has no field(s) {unknown}; its fields are {sorted(known - {'dtype'})} "
            "(text length: max_position)."
        )
    return ViltConfig(**{**fields, **kwargs})


_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")


@register("vilt", inputs=_INPUTS)
def vilt(dtype=jnp.float32, preset: str = "vilt-b32", **kwargs) -> ViltModel:
    """`preset`: "vilt-b32" or "hf_vilt:/dir" (the checkpoint's config.json); kwargs override
    fields (e.g. num_layers=2 for a test)."""
    return ViltModel(vilt_config(preset, **kwargs), dtype=dtype)


class ViltFigure(ViltModel):
    """`ViltModel` called as `(image, input_ids, attention_mask)` with `image` in [0, 1] NHWC
    (kd_jax's image convention; `pixels_from_image` normalises it, every pixel is real): the
    figure encoder of lecture retrieval, which reads a figure crop and its OCR text (batch keys
    "image", "ocr_ids", "ocr_mask", `kd_jax.data.lectures`). Same parameters as `ViltModel`, so
    `pretrained:hf_vilt:<dir>` loads into it unchanged."""

    def __call__(self, image, input_ids, attention_mask=None, *, train: bool = False, **kwargs):
        return super().__call__(
            input_ids, attention_mask, pixels_from_image(image), None, train=train, **kwargs
        )


@register("vilt_figure", inputs=("image", "ocr_ids", "ocr_mask"))
def vilt_figure(dtype=jnp.float32, preset: str = "vilt-b32", **kwargs) -> ViltFigure:
    """ViLT over a [0, 1] figure image and its OCR tokens; kwargs as for "vilt"."""
    return ViltFigure(vilt_config(preset, **kwargs), dtype=dtype)
