"""Distillation objectives and their registry.

Every objective is a pure function with KEYWORD-ONLY arguments using the standard names
`student`, `teacher` (pairwise objectives), `labels` (supervised ones), `mask` and `reduction`,
plus hyper-parameters with defaults. Inputs are cast to float32 and a float32 array is returned.
The per-example/per-position loss `l` is reduced by `reduce_loss`:
'none' -> l, 'sum' -> sum(l * mask), 'mean' -> sum(l * mask) / max(sum(mask), 1).

Configs refer to objectives by name: `get("hinton_kd")`, `names()`; `accepts(fn)` tells the
composer which standard arguments a function takes.
"""

from kd_jax.losses.chunked import OBJECTIVES as _CHUNKED
from kd_jax.losses.chunked import chunked_kd, chunked_topk_kl, fused_kd_loss
from kd_jax.losses.features import attention_transfer, cwd, fitnets, mse
from kd_jax.losses.logits import ce, dkd, dkd_parts, hinton_kd
from kd_jax.losses.minilm import (
    OBJECTIVES as _MINILM,
)
from kd_jax.losses.minilm import (
    minilm_attention,
    minilm_value_relation,
    minilmv2_relation,
)
from kd_jax.losses.reduce import REDUCTIONS, reduce_loss
from kd_jax.losses.registry import (
    accepts,
    get,
    mark_token_level,
    names,
    optional,
    register,
    token_level,
)
from kd_jax.losses.segmentation import OBJECTIVES as _SEGMENTATION
from kd_jax.losses.segmentation import hcl, pea, pixel_kd, seg_ce
from kd_jax.losses.sequence import OBJECTIVES as _SEQUENCE
from kd_jax.losses.sequence import forward_kl, generalized_jsd, reverse_kl, vocab_check
from kd_jax.losses.span import span_ce
from kd_jax.losses.sparse import OBJECTIVES as _SPARSE
from kd_jax.losses.sparse import sparse_kl, topk_kl
from kd_jax.losses.topk_jsd import topk_jsd

for _name, _fn in {**_MINILM, **_SEQUENCE, **_SEGMENTATION}.items():
    register(_name)(_fn)
for _name, _fn in {**_CHUNKED, **_SPARSE}.items():
    register(_name)(_fn)
mark_token_level(*_SEQUENCE, *_CHUNKED, *_SPARSE)

__all__ = [
    "chunked_kd",
    "chunked_topk_kl",
    "fused_kd_loss",
    "optional",
    "sparse_kl",
    "token_level",
    "topk_kl",
    "topk_jsd",
    "REDUCTIONS",
    "accepts",
    "attention_transfer",
    "ce",
    "cwd",
    "dkd",
    "dkd_parts",
    "fitnets",
    "hcl",
    "forward_kl",
    "generalized_jsd",
    "get",
    "hinton_kd",
    "minilm_attention",
    "minilm_value_relation",
    "minilmv2_relation",
    "mse",
    "pea",
    "pixel_kd",
    "names",
    "reduce_loss",
    "register",
    "reverse_kl",
    "seg_ce",
    "span_ce",
    "vocab_check",
]
