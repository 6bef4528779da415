"""BERT encoder (Devlin et al. 2019) in Flax linen, numerically matching Hugging Face `BertModel`.

Post-LayerNorm blocks, exact (erf) GELU, LayerNorm eps 1e-12, learned absolute positions. The
pooler (tanh on [CLS]) is not part of the module: sentence embeddings use `mean_pool`.
Weights load from a Hugging Face checkpoint with `kd_jax.models.bert_loading.load_bert`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError, UnsupportedFileError
from kd_jax.models.registry import preset_fields, register

# Added to the attention logits of padded keys. Finite (unlike -inf, or HF's float32 min, which
# overflows once anything is subtracted or divided by a temperature < 1), yet exp() of it is 0.
MASK_VALUE = -1e9

# "explicit": einsum + float32 softmax (the reference path, always used under attention dropout).
# "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation; "cudnn" is the fused
# (flash) kernel on NVIDIA GPUs and needs bfloat16/float16 compute.
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; field names follow ours, `from_hf_json` maps HF's `config.json`."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # How the attention context is computed where no attention dropout is in effect (eval, a
    # frozen teacher, or attention_dropout=0); see `BertSelfAttention`.
    attention_impl: str = "explicit"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigValueError(
                f"BERT hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}: set hidden_size / num_heads in the model's kwargs (or its "
                "preset) so that num_heads divides hidden_size."
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigValueError(
                f"Unknown attention_impl {self.attention_impl!r} (model kwargs); use one of "
                f"{ATTENTION_IMPLS}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_json(cls, path, **overrides) -> BertConfig:
        """Reads a Hugging Face BERT `config.json` (file path, or a directory containing it)."""
        hf = read_hf_json(path)
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedFileError(
                f"{path}: only position_embedding_type='absolute' is supported, got "
                f"{hf['position_embedding_type']!r}; use a BERT checkpoint with absolute "
                "positions."
            )
        fields = hf_encoder_fields(hf, dropout=0.1)
        fields.update(overrides)
        return cls(**fields)


def read_hf_json(path, model_type: str | None = None) -> dict:
    """A Hugging Face `config.json` (its path, or its directory), checked for the exact GELU that
    these encoders implement and, if given, the model type."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        hf = json.load(f)
    if model_type and hf.get("model_type", model_type) != model_type:
        raise UnsupportedFileError(
            f"{path}: model_type is {hf['model_type']!r}, expected {model_type!r}; point the "
            f"config at a {model_type} checkpoint."
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedFileError(
            f"{path}: only hidden_act='gelu' (erf) is supported, got {hf['hidden_act']!r}; use "
            "a checkpoint with the exact GELU."
        )
    return hf


def hf_encoder_fields(hf: dict, dropout: float) -> dict:
    """The fields a BERT-style Hugging Face config shares with ours (`dropout`: the default of the
    two dropout probabilities when the file has none)."""
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", dropout),
        attention_dropout=hf.get("attention_probs_dropout_prob", dropout),
    )


def _dense(features: int, name: str, dtype) -> nn.Dense:
    # BERT's initializer: N(0, 0.02) weights, zero bias.
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    # Statistics in float32 even for bf16 compute: eps 1e-12 is below bf16 resolution.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention + output projection + residual LayerNorm (HF `BertAttention`)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, additive_mask, *, train: bool):
        cfg = self.config
        b, t, _ = x.shape
        q = _dense(cfg.hidden_size, "query", self.dtype)(x)
        k = _dense(cfg.hidden_size, "key", self.dtype)(x)
        v = _dense(cfg.hidden_size, "value", self.dtype)(x)

        def heads(y):  # [B, T, hidden] -> [B, H, T, d]
            return y.reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)

        # Logits and softmax in float32: they are also distillation targets (MiniLM). Under jit
        # they are computed only where something reads them (a loss, or the explicit context).
        logits = jnp.einsum(
            "bhqd,bhkd->bhqk", heads(q), heads(k), preferred_element_type=jnp.float32
        ) / math.sqrt(cfg.head_dim)
        logits = logits + additive_mask
        probs = jax.nn.softmax(logits, axis=-1)
        if cfg.attention_impl == "explicit" or (train and cfg.attention_dropout > 0):
            dropped = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
            ctx = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(self.dtype), heads(v))
            ctx = ctx.transpose(0, 2, 1, 3).reshape(b, t, cfg.hidden_size)
        else:
            # The fused path: no [B, H, T, T] tensor for layers whose attention no loss reads
            # (a frozen teacher's lower layers). Same function: softmax(QK^T/sqrt(d) + mask) V.
            # cuDNN wants the bias at full [B, 1, T, T]; a float16 bias saturates at its min.
            split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)  # noqa: E731
            bias = jnp.maximum(additive_mask, 0.5 * jnp.finfo(q.dtype).min)
            ctx = jax.nn.dot_product_attention(
                split(q),
                split(k),
                split(v),
                bias=jnp.broadcast_to(bias, (b, 1, t, t)).astype(q.dtype),
                implementation=cfg.attention_impl,
            ).reshape(b, t, cfg.hidden_size)
        out = _dense(cfg.hidden_size, "output", self.dtype)(ctx)
        out = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(out)
        out = _layer_norm(cfg, "LayerNorm")(out + x).astype(self.dtype)
        feats = {"q": q, "k": k, "v": v, "attn_logits": logits, "attn_probs": probs}
        return out, feats


class BertLayer(nn.Module):
    """One post-LN transformer block: attention, then GELU feed-forward, each with residual + LN."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, additive_mask, *, train: bool):
        cfg = self.config
        h, feats = BertSelfAttention(cfg, self.dtype, name="attention")(
            x, additive_mask, train=train
        )
        y = _dense(cfg.intermediate_size, "intermediate", self.dtype)(h)
        y = nn.gelu(y, approximate=False)
        y = _dense(cfg.hidden_size, "output", self.dtype)(y)
        y = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(y)
        out = _layer_norm(cfg, "LayerNorm")(y + h).astype(self.dtype)
        feats["hidden"] = out
        return out, feats


class BertEncoder(nn.Module):
    """BERT embeddings + `num_layers` blocks; returns `(last_hidden, features)`.

    Args (to `__call__`):
      input_ids: int [B, T].
      attention_mask: 0/1 [B, T] (1 = real token). Padded keys get `MASK_VALUE` added to their
        attention logits; padded query rows are computed (as in HF) and left to the caller.
      token_type_ids: optional int [B, T] (default zeros).
      train: enables dropout (needs a 'dropout' rng).

    Features (nested dicts, so kd_jax's lookup resolves "layer_3/q"):
      "embeddings" [B,T,D]; per layer i, "layer_{i}" = {
        "q", "k", "v": [B,T,D] projections before the head split (with bias),
        "attn_logits": [B,H,T,T] float32, QK^T/sqrt(d_head) + additive key mask,
        "attn_probs": [B,H,T,T] float32 softmax of attn_logits (before dropout),
        "hidden": [B,T,D] output of layer i};
      "last_hidden" [B,T,D] and "logits" (= last_hidden, for the `(logits, features)` interface).

    `dtype` (if given) overrides `config.dtype` as the compute dtype; params are float32.
    """

    config: BertConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        cfg = self.config
        dtype = self.dtype if self.dtype is not None else cfg.dtype
        _, t = input_ids.shape
        if t > cfg.max_position:
            raise ConfigValueError(
                f"sequence length {t} exceeds the BERT's max_position {cfg.max_position}: set "
                f"the data's max_length (data.kwargs) to at most {cfg.max_position}."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        init = nn.initializers.normal(0.02)
        emb = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
        pos = nn.Embed(
            cfg.max_position, cfg.hidden_size, embedding_init=init, name="position_embeddings"
        )
        typ = nn.Embed(
            cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings"
        )
        x = emb(input_ids) + pos(jnp.arange(t)[None, :]) + typ(token_type_ids)
        x = _layer_norm(cfg, "embeddings_LayerNorm")(x).astype(dtype)
        x = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(x)

        valid = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]  # [B,1,1,T] keys
        additive = jnp.where(valid, 0.0, MASK_VALUE).astype(jnp.float32)
        feats: dict[str, Any] = {"embeddings": x}
        for i in range(cfg.num_layers):
            x, layer_feats = BertLayer(cfg, dtype, name=f"layer_{i}")(x, additive, train=train)
            feats[f"layer_{i}"] = layer_feats
        feats["last_hidden"] = x
        feats["logits"] = x
        return x, feats


def mean_pool(last_hidden, mask):
    """Mean over valid tokens (sentence-transformers pooling): [B,T,D], [B,T] -> [B,D] float32."""
    m = jnp.asarray(mask).astype(jnp.float32)[..., None]
    total = jnp.sum(last_hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def normalize(x, eps: float = 1e-12):
    """L2-normalise the last axis, x / max(||x||, eps) (torch `F.normalize`)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
    return x / norm


class BertClassifier(nn.Module):
    """BERT encoder + a sequence-classification head (GLUE fine-tuning).

    `pooling`: "cls" (BERT fine-tuning: a tanh dense "pooler" on the [CLS] state, as HF's
    BertForSequenceClassification; the pooler is trained from scratch since the loaders drop
    checkpoint poolers) or "mean" (masked mean of the last states). Then dropout and a dense layer
    to `num_classes`. Params: {"encoder": BertEncoder params, "pooler", "head"}, so encoder weights
    from a checkpoint or a distilled student graft into "encoder" (`student.init`).
    Returns `(logits [B, C], features)`: the encoder's features plus "pooled" and "logits".
    """

    config: BertConfig
    num_classes: int = 2
    pooling: str = "cls"
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        cfg = self.config
        last, feats = BertEncoder(cfg, self.dtype, name="encoder")(
            input_ids, attention_mask, token_type_ids, train=train
        )
        if self.pooling == "cls":
            pooled = jnp.tanh(_dense(cfg.hidden_size, "pooler", self.dtype)(last[:, 0]))
        elif self.pooling == "mean":
            pooled = mean_pool(last, attention_mask)
        else:
            raise ConfigValueError(
                f"Unknown pooling '{self.pooling}' (model kwargs pooling); use 'cls' or 'mean'."
            )
        pooled = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(pooled)
        logits = _dense(self.num_classes, "head", jnp.float32)(pooled.astype(jnp.float32))
        return logits, {**feats, "pooled": pooled, "logits": logits}


class BertSpanQA(nn.Module):
    """BERT encoder + a span-extraction head (SQuAD fine-tuning, HF BertForQuestionAnswering).

    A dense layer maps every final state to two scores, start and end. Inputs are
    `[CLS] question [SEP] context [SEP]` with token_type_ids 1 on the context segment. Only
    context tokens (segment 1, excluding the closing [SEP]) and position 0 can be chosen: every
    other position (question, separators, padding) gets `MASK_VALUE` (finite, so CE stays finite).
    Position 0 ([CLS]) is the SQuAD 2.0 "no answer" span (0, 0).
    Params: {"encoder": BertEncoder params, "qa_outputs"}, so `student.init` grafts the encoder.
    Returns `(logits [B, 2, T] float32 (start, end), features)`: the encoder's features plus
    "start_logits", "end_logits" [B, T], "span_mask" [B, T] and "logits".
    """

    config: BertConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        cfg = self.config
        last, feats = BertEncoder(cfg, self.dtype, name="encoder")(
            input_ids, attention_mask, token_type_ids, train=train
        )
        scores = _dense(2, "qa_outputs", jnp.float32)(last.astype(jnp.float32))  # [B, T, 2]
        allowed = span_mask(attention_mask, token_type_ids)
        logits = jnp.where(allowed[:, None, :], jnp.moveaxis(scores, -1, 1), MASK_VALUE)
        return logits, {
            **feats,
            "start_logits": logits[:, 0],
            "end_logits": logits[:, 1],
            "span_mask": allowed,
            "logits": logits,
        }


def span_mask(attention_mask, token_type_ids):
    """bool [B, T]: positions a span may start/end at: [CLS] (no answer) and context tokens
    (token type 1, real, not the last real token, which is the closing [SEP])."""
    valid = jnp.asarray(attention_mask).astype(bool)
    t = valid.shape[1]
    pos = jnp.arange(t)[None, :]
    last = jnp.sum(valid, axis=1, keepdims=True) - 1
    if token_type_ids is None:
        context = valid
    else:
        context = valid & (jnp.asarray(token_type_ids) == 1)
    return (pos == 0) | (context & (pos != last))


_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Megatron-style tensor parallelism for `config.sharding_rules` with `mesh.model > 1`: Q/K/V
# and the MLP's first layer split their outputs over the model axis, the attention output and
# the MLP's second layer their inputs (one all-reduce each). Prepend them to the FSDP rules:
#   c.sharding_rules = (*bert.TENSOR_PARALLEL_RULES, ("student/.*", "fsdp"), (".*", "replicate"))
TENSOR_PARALLEL_RULES = (
    ("student/.*attention/(query|key|value)/(kernel|bias)$", "model:-1"),
    ("student/.*layer_[0-9]+/intermediate/(kernel|bias)$", "model:-1"),
    ("student/.*attention/output/kernel$", "model:0"),
    ("student/.*layer_[0-9]+/output/kernel$", "model:0"),
)


@register("bert", inputs=_INPUTS)
def bert_encoder(dtype=jnp.float32, preset: str = "", **kwargs) -> BertEncoder:
    """`preset` (e.g. "all-minilm-l6-v2") fills the architecture; kwargs override its fields."""
    fields = {**(preset_fields(preset) if preset else {}), **kwargs}
    return BertEncoder(BertConfig(**fields), dtype=dtype)


@register("bert_classifier", inputs=_INPUTS)
def bert_classifier(
    dtype=jnp.float32, preset: str = "", num_classes: int = 2, pooling: str = "cls", **kwargs
) -> BertClassifier:
    config = bert_encoder(dtype, preset, **kwargs).config
    return BertClassifier(config, num_classes, pooling, dtype=dtype)


@register("bert_qa", inputs=_INPUTS)
def bert_qa(dtype=jnp.float32, preset: str = "", **kwargs) -> BertSpanQA:
    return BertSpanQA(bert_encoder(dtype, preset, **kwargs).config, dtype=dtype)
