"""Distillation objectives and their registry.

Every objective is a pure function with KEYWORD-ONLY arguments using the standard names
`student`, `teacher` (pairwise objectives), `labels` (supervised ones), `mask` and `reduction`,
plus hyper-parameters with defaults. Inputs are cast to float32 and a float32 array is returned.
The per-example/per-position loss `l` is reduced by `reduce_loss`:
'none' -> l, 'sum' -> sum(l * mask), 'mean' -> sum(l * mask) / max(sum(mask), 1).

Each module below registers its objectives when imported (`@register("name")`, with
`token_level=True` for next-token divergences); configs refer to them by name: `get("hinton_kd")`,
`names()`. `accepts(fn)` tells the composer which standard arguments a function takes.
"""

from kd_jax.losses.chunked import chunked_kd, chunked_topk_kl, fused_kd_loss
from kd_jax.losses.cross_tokenizer import aligned_kl, uld
from kd_jax.losses.features import attention_transfer, cwd, fitnets, mse
from kd_jax.losses.hints import ab, fsp, ft, jacobian_matching, nst, ofd, vid
from kd_jax.losses.llm_divergences import akl, skew_kl, skew_reverse_kl, taid, tvd
from kd_jax.losses.logit_variants import dist, kd_logit_std, tf_kd_reg
from kd_jax.losses.logits import ce, dkd, dkd_parts, hinton_kd
from kd_jax.losses.minillm import minillm_pg
from kd_jax.losses.minilm import minilm_attention, minilm_value_relation, minilmv2_relation
from kd_jax.losses.mlm import mlm_ce
from kd_jax.losses.monotakd import (
    centerpoint_det,
    depth_ce,
    monotakd_cmrd,
    monotakd_imd,
    monotakd_response,
)
from kd_jax.losses.reduce import REDUCTIONS, reduce_loss
from kd_jax.losses.registry import OBJECTIVES, accepts, get, names, optional, register, token_level
from kd_jax.losses.relational import cc, crd, pkt, rkd, sp
from kd_jax.losses.retrieval import inbatch_similarity_kd, mmd_kernel, pie_diversity, vse_hinge
from kd_jax.losses.segmentation import dual_path_consistency, hcl, pea, pixel_kd, seg_ce
from kd_jax.losses.sequence import forward_kl, generalized_jsd, reverse_kl, vocab_check
from kd_jax.losses.span import span_ce
from kd_jax.losses.sparse import sparse_kl, topk_kl
from kd_jax.losses.topk_jsd import topk_jsd
from kd_jax.losses.topk_rkl import topk_reverse_kl

__all__ = [
    "OBJECTIVES",
    "REDUCTIONS",
    "ab",
    "accepts",
    "akl",
    "aligned_kl",
    "attention_transfer",
    "cc",
    "ce",
    "chunked_kd",
    "chunked_topk_kl",
    "crd",
    "cwd",
    "dist",
    "dkd",
    "dkd_parts",
    "dual_path_consistency",
    "fitnets",
    "forward_kl",
    "fsp",
    "ft",
    "fused_kd_loss",
    "generalized_jsd",
    "get",
    "hcl",
    "hinton_kd",
    "inbatch_similarity_kd",
    "jacobian_matching",
    "kd_logit_std",
    "minillm_pg",
    "minilm_attention",
    "minilm_value_relation",
    "minilmv2_relation",
    "mlm_ce",
    "centerpoint_det",
    "depth_ce",
    "monotakd_cmrd",
    "monotakd_imd",
    "monotakd_response",
    "mmd_kernel",
    "mse",
    "names",
    "nst",
    "ofd",
    "optional",
    "pea",
    "pie_diversity",
    "pixel_kd",
    "pkt",
    "reduce_loss",
    "register",
    "reverse_kl",
    "rkd",
    "seg_ce",
    "skew_kl",
    "skew_reverse_kl",
    "sp",
    "span_ce",
    "sparse_kl",
    "taid",
    "tf_kd_reg",
    "token_level",
    "topk_jsd",
    "topk_kl",
    "topk_reverse_kl",
    "tvd",
    "uld",
    "vid",
    "vocab_check",
    "vse_hinge",
]
