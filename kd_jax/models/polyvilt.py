"""PolyViLT (Lee et al., "Multimodal Lecture Presentations", arXiv:2208.08080, section 5):
multi-instance retrieval between lecture-slide figures and the slide's spoken text.

Text side: the FROZEN language model's last hidden states (a batch input, `text_hidden`,
computed once per transcript by the data source with a frozen encoder this module registers in
`kd_jax.data.registry.TEXT_ENCODERS`) -> a bidirectional GRU -> PIE-net (Song & Soleymani 2019,
PVSE, arXiv:1906.04402, section 3.1): K attention heads softmax(W2 tanh(W1 h)) over the GRU
outputs give K local vectors; each becomes a residual sigmoid(FC(.)) (dropout) added to the
global vector (the GRU's final states), then LayerNorm, then L2 normalisation -> K embeddings.

Figure side: a registered figure encoder (ViLT over the figure crop and its OCR text, model
"vilt"; or the small stand-in "lecture_cnn") whose feature "pooled" (ViLT's pooler output) is
the figure embedding. As in the released `Ours_VILT`, it is NOT L2-normalised unless
`normalize_figure`; a linear map is added only when its width differs from `embed_dim`.

Features: "fig" [B, D], "txt" [B, K, D] (unit rows), "txt_residual" [B, K, D] (PIE residuals,
what the diversity loss reads), "txt_attn" [B, L, K], "sim" [B, B] with
sim[i, j] = max_k <fig_i, txt_j^k> (figure i vs the text of example j; the MIL score) and
"logits" = "sim". The whole batch meets in "sim": every other example is a negative, figures of
the same slide included (as the released loss does).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from kd_jax.data.registry import TEXT_ENCODERS, FrozenTextEncoder
from kd_jax.models import bert
from kd_jax.models.registry import MODELS, input_keys, load_pretrained, preset_fields, register
from kd_jax.models.vilt import pixels_from_image

TEXT_INPUTS = ("text_hidden", "text_mask")


def l2_normalize(x, eps: float = 1e-8):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def mil_similarity(fig, txt):
    """[B, D] figures x [N, K, D] texts -> [B, N]: max over the K text instances of the dot
    product (cosine for unit vectors)."""
    return jnp.max(jnp.einsum("bd,nkd->bnk", fig.astype(jnp.float32), txt.astype(jnp.float32)), -1)


class PIENet(nn.Module):
    """Polysemous instance embedding: global [B, Dg] + local [B, L, Din] (mask [B, L]) ->
    (K unit embeddings [B, K, d_out], attention [B, L, K], residuals [B, K, d_out])."""

    num_embeds: int
    d_hidden: int
    d_out: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, global_vec, local, mask, *, train: bool):
        logits = nn.Dense(self.num_embeds, use_bias=False, name="w2")(
            jnp.tanh(nn.Dense(self.d_hidden, use_bias=False, name="w1")(local))
        ).astype(jnp.float32)
        logits = jnp.where(mask[..., None] > 0, logits, -1e9)
        attn = jax.nn.softmax(logits, axis=1)  # over the L positions, one distribution per head
        attended = jnp.einsum("blk,bld->bkd", attn, local.astype(jnp.float32))
        residual = nn.sigmoid(nn.Dense(self.d_out, name="fc")(attended))
        residual = nn.Dropout(self.dropout, deterministic=not train)(residual)
        out = nn.LayerNorm(name="layer_norm")(global_vec[:, None, :] + residual)
        return l2_normalize(out), attn, residual


class TextEncoder(nn.Module):
    """Frozen-LM hidden states [B, L, Dt] -> BiGRU (gru_hidden per direction) -> PIE-net."""

    embed_dim: int
    gru_hidden: int
    num_embeds: int
    attn_hidden: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, hidden, mask, *, train: bool):
        lengths = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.int32)
        gru = nn.Bidirectional(
            nn.RNN(nn.GRUCell(self.gru_hidden), name="forward"),
            nn.RNN(nn.GRUCell(self.gru_hidden), name="backward"),
            return_carry=True,
            name="gru",
        )
        (c_fw, c_bw), local = gru(hidden.astype(jnp.float32), seq_lengths=lengths)
        global_vec = jnp.concatenate([c_fw, c_bw], axis=-1)
        if 2 * self.gru_hidden != self.embed_dim:
            global_vec = nn.Dense(self.embed_dim, name="global_proj")(global_vec)
        pie = PIENet(self.num_embeds, self.attn_hidden, self.embed_dim, self.dropout, name="pie")
        return pie(global_vec, local, mask, train=train)


class LectureCNN(nn.Module):
    """A small stand-in figure encoder (not ViLT): a 3-layer CNN over the figure and a bag of
    OCR word embeddings, fused into one "pooled" vector [B, hidden] (tanh, like ViLT's pooler)."""

    hidden: int = 128
    vocab_size: int = 30522
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image, ocr_ids, ocr_mask, *, train: bool = False):
        x = image.astype(self.dtype)
        for i, w in enumerate((32, 64, 64)):
            x = nn.relu(nn.Conv(w, (3, 3), strides=2, dtype=self.dtype, name=f"conv{i}")(x))
        vis = jnp.mean(x, axis=(1, 2))
        m = ocr_mask.astype(jnp.float32)[..., None]
        words = nn.Embed(self.vocab_size, self.hidden, name="ocr_embed")(ocr_ids)
        ocr = jnp.sum(words * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        pooled = jnp.tanh(nn.Dense(self.hidden, name="pooler")(jnp.concatenate([vis, ocr], -1)))
        return pooled, {"pooled": pooled, "logits": pooled}


class PolyViLT(nn.Module):
    figure_encoder: nn.Module
    num_figure_inputs: int
    embed_dim: int = 256
    gru_hidden: int = 128
    num_embeds: int = 5
    attn_hidden: int = 128
    dropout: float = 0.1
    normalize_figure: bool = False
    pooled_feature: str = "pooled"
    vilt_inputs: bool = False

    @nn.compact
    def __call__(self, *inputs, train: bool = False):
        fig_in, (hidden, mask) = inputs[: self.num_figure_inputs], inputs[self.num_figure_inputs :]
        if self.vilt_inputs:  # lecture keys (ocr_ids, ocr_mask, image) -> ViLT's four inputs
            ids, ocr_mask, image = fig_in
            fig_in = (ids, ocr_mask, pixels_from_image(image), jnp.ones(image.shape[:3], jnp.int32))
        _, f_feats = self.figure_encoder(*fig_in, train=train)
        fig = f_feats[self.pooled_feature].astype(jnp.float32)
        if fig.shape[-1] != self.embed_dim:
            fig = nn.Dense(self.embed_dim, name="figure_proj")(fig)
        if self.normalize_figure:
            fig = l2_normalize(fig)
        txt, attn, residual = TextEncoder(
            self.embed_dim,
            self.gru_hidden,
            self.num_embeds,
            self.attn_hidden,
            self.dropout,
            name="text",
        )(hidden, mask, train=train)
        sim = mil_similarity(fig, txt)
        feats = {"fig": fig, "txt": txt, "txt_residual": residual, "txt_attn": attn, "sim": sim}
        return sim, {**feats, "logits": sim}


register(
    "lecture_cnn",
    lambda dtype=jnp.float32, **kw: LectureCNN(dtype=dtype, **kw),
    inputs=("image", "ocr_ids", "ocr_mask"),
)


def _figure_cfg(kwargs):
    return ConfigDict(
        {
            "model": kwargs.get("figure_encoder", "lecture_cnn"),
            "kwargs": dict(kwargs.get("figure_kwargs") or {}),
        }
    )


# ViLT reads (input_ids, attention_mask, pixel_values, pixel_mask); lecture sources give the
# figure's OCR ids and mask and its [0, 1] image, normalised as ViltProcessor does.
VILT_LECTURE_INPUTS = ("ocr_ids", "ocr_mask", "image")


def _figure_inputs(kwargs) -> tuple[str, ...]:
    if kwargs.get("figure_encoder", "lecture_cnn") == "vilt":
        return VILT_LECTURE_INPUTS
    return input_keys(_figure_cfg(kwargs))


def _inputs(kwargs) -> tuple[str, ...]:
    return (*_figure_inputs(kwargs), *TEXT_INPUTS)


@register("polyvilt", inputs=_inputs)
def polyvilt(
    dtype=jnp.float32, figure_encoder: str = "lecture_cnn", figure_kwargs=None, **kwargs
) -> PolyViLT:
    """kwargs: embed_dim, gru_hidden, num_embeds (K; 1 = no MIL), attn_hidden, dropout,
    normalize_figure, pooled_feature; `figure_encoder` names a registered model whose features
    include `pooled_feature`, built with `figure_kwargs`."""
    spec = {"figure_encoder": figure_encoder, "figure_kwargs": figure_kwargs}
    cfg = _figure_cfg(spec)
    encoder = MODELS.get(figure_encoder)(dtype=dtype, **dict(cfg.kwargs))
    n = len(_figure_inputs(spec))
    return PolyViLT(encoder, n, vilt_inputs=figure_encoder == "vilt", **kwargs)


# The frozen text encoders of the lecture sources (`kd_jax.data.lectures`, text_encoder=...).
def _bert_text_encoder(module: bert.BertEncoder, variables: dict, tokenizer: str | None):
    return FrozenTextEncoder(
        lambda v, ids, mask: module.apply(v, ids, mask)[0], variables, tokenizer
    )


@TEXT_ENCODERS.register("pretrained")
def _pretrained_text_encoder(name: str) -> FrozenTextEncoder:
    """Spec "pretrained:<preset>" (e.g. all-minilm-l6-v2) or "pretrained:hf_bert:<dir>" (a HF
    BERT directory, e.g. bert-base-uncased, whose vocabulary it reads)."""
    module = bert.BertEncoder(bert.BertConfig(**preset_fields(name)))
    tok = name.split(":", 1)[1] if name.startswith("hf_bert:") else None
    return _bert_text_encoder(module, load_pretrained(name), tok)


@TEXT_ENCODERS.register("random_bert")
def _random_text_encoder(hidden: str) -> FrozenTextEncoder:
    """Spec "random_bert:<hidden>": a 1-layer random BERT over MiniLM's vocabulary (tests)."""
    h = int(hidden)
    cfg = bert.BertConfig(hidden_size=h, num_layers=1, num_heads=2, intermediate_size=2 * h)
    module = bert.BertEncoder(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    return _bert_text_encoder(module, module.init(jax.random.PRNGKey(0), ids, ids), None)
