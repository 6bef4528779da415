"""BERT with its masked-language-model head (Devlin et al. 2019, arXiv:1810.04805, Sec. 3.1,
"Task #1: Masked LM"), matching Hugging Face `BertForMaskedLM`'s `cls.predictions`.

The head maps every final hidden state h [B, T, D] to vocabulary logits:
    z = LayerNorm(gelu(h W_t + b_t));  logits = z E^T + b_out
where E [V, D] is the encoder's word-embedding table (the decoder is *tied* to it, as in BERT)
and b_out [V] is the head's own output bias. Masking is not part of the model: the stage kind
"mlm" (`kd_jax.trainers.mlm`) masks the batch and the `mlm_ce` objective scores the masked
positions.

Params: {"encoder": `BertEncoder` params, "mlm_head": {"transform", "LayerNorm", "bias"}}, the
same layout as `bert_classifier` / `bert_qa`, so the encoder exports as a HF `BertModel`
(`kd_jax.export`, the head left out) and evaluates like a distilled `bert` student
(`encoder_params`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.bert import _INPUTS, BertConfig, BertEncoder, _dense, _layer_norm, bert_encoder
from kd_jax.models.registry import register


class BertMLM(nn.Module):
    """BERT encoder + the tied MLM head (module docstring).

    Returns `(logits [B, T, V] float32, features)`: the encoder's features (so distillation terms
    can read "layer_2/attn_logits" of an MLM student too) plus "mlm_logits" and "logits" (both
    the vocabulary logits; "last_hidden" stays the encoder's output).
    """

    config: BertConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        cfg = self.config
        encoder = BertEncoder(cfg, self.dtype, name="encoder")
        last, feats = encoder(input_ids, attention_mask, token_type_ids, train=train)
        logits = MLMHead(cfg, self.dtype, name="mlm_head")(
            last, encoder.variables["params"]["word_embeddings"]["embedding"]
        )
        return logits, {**feats, "mlm_logits": logits, "logits": logits}


class MLMHead(nn.Module):
    """HF `BertLMPredictionHead`: dense + exact GELU + LayerNorm, decoder tied to `embedding`."""

    config: BertConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, hidden, embedding):
        cfg = self.config
        dtype = self.dtype if self.dtype is not None else cfg.dtype
        z = _dense(cfg.hidden_size, "transform", dtype)(hidden)
        z = nn.gelu(z, approximate=False)
        z = _layer_norm(cfg, "LayerNorm")(z)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
        logits = jnp.einsum(
            "btd,vd->btv",
            z.astype(dtype),
            embedding.astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return logits + bias


def encoder_params(params: dict) -> dict:
    """The `bert` encoder params inside a `bert_mlm` (or classifier / QA) params tree; a plain
    `bert` tree is returned as is."""
    return params["encoder"] if "encoder" in params else params


@register("bert_mlm", inputs=_INPUTS)
def bert_mlm(dtype=jnp.float32, preset: str = "", **kwargs) -> BertMLM:
    """`preset` (e.g. "all-minilm-l6-v2") fills the architecture; kwargs override its fields."""
    return BertMLM(bert_encoder(dtype, preset, **kwargs).config, dtype=dtype)
