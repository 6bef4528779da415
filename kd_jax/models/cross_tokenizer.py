"""A teacher that reads its own tokenization and answers at the student's positions.

"llama_aligned" is a `Llama` (the same parameters, so "pretrained:<preset>" weights load
unchanged) called with the batch keys of `kd_jax.data.orca_cross`:
(teacher_input_ids, teacher_positions, teacher_segment_ids, align_index, align_continuation).
It runs on the teacher's packed rows [B, T_t], gathers its final hidden states at `align_index`
(the teacher position aligned to each student position) and applies its LM head there, so its
features are on the student's positions [B, T_s]:
  "logits"        float32 [B, T_s, V_t]: the teacher's next-token logits after the same text the
                  student has read (at unaligned positions those of teacher position 0: the
                  objectives drop them by "aligned");
  "aligned"       float32 [B, T_s]: 1 where the student position has a teacher position;
  "continuation"  float32 [B, T_s]: 1 where the student's next token continues a word
                  (which teacher -> student vocabulary map applies, `kd_jax.cross_tokenizer`).
Cross-tokenizer objectives read them together: teacher="logits,aligned,continuation".
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax.models.llama import Llama, _config
from kd_jax.models.registry import register

INPUTS = (
    "teacher_input_ids",
    "teacher_positions",
    "teacher_segment_ids",
    "align_index",
    "align_continuation",
)


class AlignedLlama(Llama):
    """`Llama` on the teacher's rows, its outputs gathered at the student's positions."""

    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        align_index=None,
        align_continuation=None,
        *,
        train=False,
        **kwargs,
    ):
        hidden, features = super().__call__(
            input_ids, positions=positions, segment_ids=segment_ids, train=train, hidden_only=True
        )
        index = jnp.asarray(align_index).astype(jnp.int32)
        aligned = index >= 0
        at = jnp.take_along_axis(hidden, jnp.clip(index, 0)[..., None], axis=1)
        logits = self.logits_from_hidden(at)
        continuation = jnp.asarray(align_continuation).astype(jnp.float32)
        features = {
            "hidden": features["hidden"],
            "logits": logits,
            "aligned": aligned.astype(jnp.float32),
            "continuation": continuation,
        }
        return logits, features


@register("llama_aligned", inputs=INPUTS)
def llama_aligned(dtype=jnp.float32, preset: str = "", **kwargs) -> AlignedLlama:
    """`preset` (e.g. "smollm2-135m-instruct") fills the architecture; kwargs override it."""
    return AlignedLlama(_config(preset, kwargs), dtype=dtype)
