"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, ...) in Flax linen, matching HF `LlamaModel`.

Pre-RMSNorm blocks, rotary positions (HF convention: `rotate_half` on the two halves of each
head), grouped-query attention, SwiGLU MLP, no biases (Qwen2: `attention_bias=True` adds biases
to the q/k/v projections), tied or untied LM head. The blocks run under
`nn.scan`, so a 30-layer model compiles one block; every block parameter has a leading layer axis
[L, ...] (`kd_jax.models.gguf_loading` stacks checkpoint weights that way).

Packing (Orca-style, several examples in one row): pass `segment_ids` (0 = padding) to make
attention block-diagonal, and `positions` that restart at 0 for each example; each example's
logits then equal those of the example run alone. Generation uses the KV cache from `init_cache`
(see `kd_jax.models.generate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.models.registry import preset_fields, register

# Added to the attention logits of keys a query may not see. Finite, so a row with no visible key
# (a padding query) gives a uniform distribution rather than NaN; exp() of it is exactly 0.
MASK_VALUE = -1e9


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama decoder. Defaults are SmolLM2-135M's (the bundled teacher)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_position: int = 8192
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2)
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigValueError(
                f"Llama hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}: fix the model's kwargs (or preset)."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}: fix the model's kwargs (or preset)."
            )
        if self.head_dim % 2:
            raise ConfigValueError(
                f"RoPE needs an even head_dim (hidden_size / num_heads), got {self.head_dim}: fix "
                "the model's kwargs (or preset)."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache for `max_length` token slots.

    {"k", "v": [L, B, S, kv_heads, head_dim] (compute dtype), "segment_ids": [B, S] int32 (0 =
    empty or padding), "index": int32 scalar, the next slot to write}. A call with `cache=` writes
    its T tokens at slots [index, index + T); the caller must keep index + T <= S (XLA clamps an
    out-of-range write instead of failing).
    """
    dtype = config.dtype if dtype is None else dtype
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin of the rotary angles, float32 [B, T, 1, head_dim] (HF `LlamaRotaryEmbedding`)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """HF `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_segments, k_segments, q_slots, k_slots):
    """Boolean [B, 1, 1, T, S]: key slot <= query slot and the same segment id.

    Causality is by slot (order in the row), not by position, so packed examples whose positions
    restart still see only their own past.
    """
    causal = k_slots[None, None, :] <= q_slots[..., None]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (causal & same)[:, None, None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (HF `LlamaRMSNorm`)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def _dense(features: int, name: str, dtype, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class LlamaBlock(nn.Module):
    """One pre-norm block; the scan body: (x, layer_cache, rope, mask, index) -> (x, (x, cache))."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, rope, mask, cache_index):
        cfg = self.config
        b, t, _ = x.shape
        hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x)
        bias = cfg.attention_bias
        q = _dense(hq * dh, "q_proj", self.dtype, bias)(h).reshape(b, t, hq, dh)
        k = _dense(hkv * dh, "k_proj", self.dtype, bias)(h).reshape(b, t, hkv, dh)
        v = _dense(hkv * dh, "v_proj", self.dtype, bias)(h).reshape(b, t, hkv, dh)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(
                layer_cache["k"], k.astype(layer_cache["k"].dtype), start
            )
            v = jax.lax.dynamic_update_slice(
                layer_cache["v"], v.astype(layer_cache["v"].dtype), start
            )
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        # GQA without repeating K/V: query head h uses kv head h // group (HF `repeat_kv` order).
        q = q.reshape(b, t, hkv, hq // hkv, dh)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits / math.sqrt(dh), MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1)
        ctx = jnp.einsum("bkgts,bskd->btkgd", probs.astype(self.dtype), v)
        x = x + _dense(cfg.hidden_size, "o_proj", self.dtype)(ctx.reshape(b, t, hq * dh))
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="mlp_norm")(x)
        gate = _dense(cfg.intermediate_size, "gate_proj", self.dtype)(h)
        up = _dense(cfg.intermediate_size, "up_proj", self.dtype)(h)
        x = x + _dense(cfg.hidden_size, "down_proj", self.dtype)(nn.silu(gate) * up)
        return x, (x, new_cache)


class LMHead(nn.Module):
    """Untied output projection, kernel [D, V]; logits accumulate and come out in float32."""

    vocab_size: int
    dtype: Any = jnp.float32
    hidden_size: int = 0

    def setup(self):
        # In setup (not compact), so `Llama` can read the kernel without computing logits.
        self.kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (self.hidden_size, self.vocab_size), jnp.float32
        )

    def __call__(self, h):
        return jnp.einsum(
            "...d,dv->...v", h, self.kernel.astype(self.dtype), preferred_element_type=jnp.float32
        )


class Llama(nn.Module):
    """Decoder-only LM; `__call__` returns `(logits, features)`.

    Args (to `__call__`):
      input_ids: int [B, T].
      positions: int [B, T] rotary positions; default `index + arange(T)` (index = 0 without a
        cache). Packed rows pass positions that restart per example.
      segment_ids: int [B, T]; a query sees only earlier (or same) slots with the same id, so
        packed examples do not attend to each other and padding (id 0) is never seen by real
        tokens. Default: all ones (plain causal attention).
      train: accepted for the `(logits, features)` model interface; Llama has no dropout.
      cache: a dict from `init_cache` (or a previous call's features["cache"]): the T tokens are
        written at slots [index, index + T) and attend to every filled slot before them.
      hidden_only: skip the LM head; the first output is then features["hidden"] (for losses
        that apply the head chunk by chunk, see `kd_jax.losses.chunked`). The module field
        `skip_logits=True` does the same for every call (so a training step never builds
        [B, T, V]; jit also prunes unread logits, so this mostly matters for clarity).

    Returns `(logits [B, T, V] float32, features)`, features = {
      "hidden": [B, T, D] final-normed hidden state (the LM head's input),
      "lm_head": [D, V] float32 LM-head kernel (a view of the params; gradients flow to them),
      "layer_{i}": {"hidden": [B, T, D] residual stream after block i (before the final norm)},
      "logits": logits (absent with hidden_only), "cache": the updated cache (only with cache=)}.

    `dtype` (if given) overrides `config.dtype` as the compute dtype; params are float32;
    attention logits, softmax, norms, RoPE and LM-head logits are float32.
    """

    config: LlamaConfig
    dtype: Any = None
    skip_logits: bool = False  # every call acts as hidden_only (model kwarg `skip_logits`)

    def setup(self):
        cfg = self.config
        dtype = self.dtype if self.dtype is not None else cfg.dtype
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            dtype=dtype,
        )
        self.layers = nn.scan(
            LlamaBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, dtype, cfg.hidden_size)

    def head_kernel(self):
        """The LM head as a float32 [D, V] matrix (the transposed embedding when tied)."""
        if self.config.tie_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head.kernel

    def logits_from_hidden(self, hidden):
        """The LM head alone: [..., D] -> float32 [..., V]."""
        if self.config.tie_embeddings:
            emb = self.embed_tokens.embedding.astype(hidden.dtype)
            return jnp.einsum("...d,vd->...v", hidden, emb, preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids,
        *,
        positions=None,
        segment_ids=None,
        train: bool = False,
        cache=None,
        hidden_only: bool = False,
    ):
        del train  # no dropout in Llama
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        slots = jnp.arange(t, dtype=jnp.int32)
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if cache is None and t > cfg.max_position:
            raise ConfigValueError(
                f"sequence length {t} exceeds the Llama's max_position {cfg.max_position}: "
                f"shorten the data's sequences (data.kwargs seq_len / max lengths) to at most "
                f"{cfg.max_position}."
            )
        if cache is not None and t > cache["segment_ids"].shape[1]:
            raise ValueError(f"{t} tokens do not fit a cache of {cache['segment_ids'].shape[1]}.")
        if positions is None:
            positions = jnp.broadcast_to(index + slots, (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)

        if cache is None:
            mask = attention_mask(segment_ids, segment_ids, slots, slots)
            layer_cache, k_segments = None, segment_ids
        else:
            k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
            s = k_segments.shape[1]
            mask = attention_mask(segment_ids, k_segments, index + slots, jnp.arange(s))
            layer_cache = {"k": cache["k"], "v": cache["v"]}

        x = self.embed_tokens(input_ids)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        x, (per_layer, new_kv) = self.layers(x, layer_cache, rope, mask, index)
        hidden = self.norm(x)

        # "lm_head" lets chunked losses apply the head themselves (`kd_jax.losses.chunked`).
        features: dict[str, Any] = {"hidden": hidden, "lm_head": self.head_kernel()}
        for i in range(cfg.num_layers):
            features[f"layer_{i}"] = {"hidden": per_layer[i]}
        if cache is not None:
            features["cache"] = {**new_kv, "segment_ids": k_segments, "index": index + t}
        if hidden_only or self.skip_logits:
            return hidden, features
        logits = self.logits_from_hidden(hidden)
        features["logits"] = logits
        return logits, features


def lm_head_kernel(params, config: LlamaConfig):
    """The LM head as a [D, V] float32 matrix (the transposed embedding when tied)."""
    p = params["params"] if "params" in params else params
    if config.tie_embeddings:
        return jnp.asarray(p["embed_tokens"]["embedding"]).T
    return jnp.asarray(p["lm_head"]["kernel"])


class PackedLlama(Llama):
    """`Llama` called with positional `(input_ids, positions, segment_ids)`: the registry entry
    "llama_packed" reads those three batch keys (Orca packed rows, `kd_jax.data.orca`). Same
    parameters as `Llama`, so weights load and transfer unchanged."""

    def __call__(self, input_ids, positions=None, segment_ids=None, *, train=False, **kwargs):
        return super().__call__(
            input_ids, positions=positions, segment_ids=segment_ids, train=train, **kwargs
        )


def tensor_parallel_rules(prefix: str = "student/") -> tuple[tuple[str, str], ...]:
    """Megatron-style tensor parallelism over the mesh's model axis, as `sharding.tree_shardings`
    rules for the params under `prefix` ("student/" in a stage's train state, "" for a
    teacher's own variables tree, "params/..."):
      q/k/v (and their Qwen2 biases), gate and up: column-parallel (outputs split, 'model:-1');
      o and down: row-parallel (inputs split, 'model:-2'; one all-reduce each);
      the embedding [V, D]: vocab-parallel rows ('model:-2'); an untied LM head [D, V]:
      vocab-parallel columns ('model:-1'). A tied head is the transposed embedding, so it is
      vocab-parallel too (its [D, V] view is split along V).
    The dims are negative, so the leading layer axis of the scanned blocks [L, ...] (and the seed
    axis) are never split. GSPMD keeps the computation the same for any split (heads need not
    align with the shards); the rules choose the layout. Sizes must divide by mesh.model."""
    p = f"(^|/){prefix}" if prefix else "(^|/)params/"
    return (
        (f"{p}(.*/)?layers/(q|k|v)_proj/(kernel|bias)$", "model:-1"),
        (f"{p}(.*/)?layers/(gate|up)_proj/kernel$", "model:-1"),
        (f"{p}(.*/)?layers/(o|down)_proj/kernel$", "model:-2"),
        (f"{p}(.*/)?embed_tokens/embedding$", "model:-2"),
        (f"{p}(.*/)?lm_head/kernel$", "model:-1"),
    )


# For `config.sharding_rules` with `mesh.model > 1`, before the FSDP rules:
#   c.sharding_rules = (*llama.TENSOR_PARALLEL_RULES, ("student/.*", "fsdp"), (".*", "replicate"))
# (optimizer moments follow: the rules are searched in "opt_state/.../student/..." paths too).
TENSOR_PARALLEL_RULES = tensor_parallel_rules("student/")


def _config(preset: str, kwargs: dict) -> LlamaConfig:
    return LlamaConfig(**{**(preset_fields(preset) if preset else {}), **kwargs})


@register("llama", inputs=("input_ids",))
def llama(dtype=jnp.float32, preset: str = "", skip_logits: bool = False, **kwargs) -> Llama:
    """`preset` (e.g. "smollm2-135m-instruct") fills the architecture; kwargs override it."""
    return Llama(_config(preset, kwargs), dtype=dtype, skip_logits=skip_logits)


@register("llama_packed", inputs=("input_ids", "positions", "segment_ids"))
def llama_packed(dtype=jnp.float32, preset: str = "", skip_logits: bool = False, **kwargs):
    return PackedLlama(_config(preset, kwargs), dtype=dtype, skip_logits=skip_logits)
