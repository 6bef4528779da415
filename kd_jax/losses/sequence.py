"""Token-level objectives for LLM distillation: forward KL, reverse KL, GKD's generalized JSD.

Conventions: keyword-only; `student`, `teacher` are logits [B, T, V] (any leading shape works)
over the SAME vocabulary (a size mismatch raises; see `vocab_check`); computed in float32.
The per-token loss l [B, T] is reduced by `reduce_loss` with `mask` [B, T] (1 = a token that
counts, e.g. Orca's response tokens; a [B] mask selects whole sequences):
  'none' -> l (masked tokens 0), 'sum' -> sum(l * mask),
  'mean' -> sum(l * mask) / max(sum(mask), 1): a TOKEN-level mean over all masked tokens of the
  batch (long responses weigh more), not a mean of per-sequence means.

All three divergences are taken between softmax(logits / temperature) and multiplied by
temperature^2 (Hinton's gradient-scale correction), so T = 1 gives the plain divergence. Logits
may contain -inf (e.g. padded vocabulary entries): a zero-probability term contributes 0.

Each registers itself as a token-level objective (`kd_jax.losses.registry`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.errors import ConfigValueError
from kd_jax.losses.logits import kl_divergence
from kd_jax.losses.reduce import reduce_loss
from kd_jax.losses.registry import register


def vocab_check(
    student_vocab: int, teacher_vocab: int, student_tokenizer_name: str, teacher_tokenizer_name: str
) -> None:
    """`ValueError` naming both vocabulary sizes and both tokenizers when the sizes differ.

    Token-level KD compares distributions position by position over one vocabulary, so teacher
    and student must share the tokenizer (and the same padded vocabulary size; e.g. Qwen2.5
    checkpoints pad to 151936 or 152064). Call it when building the experiment, before any step.
    """
    if int(student_vocab) != int(teacher_vocab):
        raise ConfigValueError(
            f"student vocabulary size {student_vocab} (tokenizer '{student_tokenizer_name}') "
            f"differs from teacher vocabulary size {teacher_vocab} (tokenizer "
            f"'{teacher_tokenizer_name}'). Token-level distillation needs one shared tokenizer "
            "and vocabulary; if the tokenizers are the same and only the padded sizes differ, "
            "slice both logits to the real vocabulary before the loss."
        )


def _log_probs(student, teacher, temperature):
    s = jnp.asarray(student).astype(jnp.float32)
    t = jnp.asarray(teacher).astype(jnp.float32)
    if tuple(s.shape) != tuple(t.shape):
        if s.shape[:-1] == t.shape[:-1]:
            raise ConfigValueError(
                f"student vocabulary {s.shape[-1]} != teacher vocabulary {t.shape[-1]} "
                f"(logits {tuple(s.shape)} vs {tuple(t.shape)}); see sequence.vocab_check."
            )
        raise ConfigValueError(
            f"student shape {tuple(s.shape)} does not match teacher shape {tuple(t.shape)}."
        )
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ConfigValueError(f"temperature must be > 0, got {temperature}.")
    return (
        jax.nn.log_softmax(s / temperature, axis=-1),
        jax.nn.log_softmax(t / temperature, axis=-1),
    )


@register("forward_kl", token_level=True)
def forward_kl(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 1.0):
    """T^2 * KL(p_teacher || p_student) per token (mode-covering; the classic KD / SFT-on-logits).

    Args:
      student, teacher: logits [B, T, V] (or any [..., V]), same shape.
      mask: optional 0/1 [B, T] (or a prefix such as [B]); 1 = token counts.
      reduction: 'mean' (token-level mean over masked tokens), 'sum', or 'none' ([B, T]).
      temperature: T > 0; both softmaxes at T, result times T^2.

    Returns: float32 scalar, or [B, T] for 'none'.
    """
    log_ps, log_pt = _log_probs(student, teacher, temperature)
    return reduce_loss(
        kl_divergence(log_pt, log_ps) * temperature**2, mask=mask, reduction=reduction
    )


@register("reverse_kl", token_level=True)
def reverse_kl(*, student, teacher, mask=None, reduction: str = "mean", temperature: float = 1.0):
    """T^2 * KL(p_student || p_teacher) per token (mode-seeking; MiniLLM, GKD at beta=1).

    Same arguments and reduction as `forward_kl`.
    """
    log_ps, log_pt = _log_probs(student, teacher, temperature)
    return reduce_loss(
        kl_divergence(log_ps, log_pt) * temperature**2, mask=mask, reduction=reduction
    )


@register("generalized_jsd", token_level=True)
def generalized_jsd(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    beta: float = 0.5,
):
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024), times T^2.

    With P = p_teacher, Q = p_student and the mixture M = beta * P + (1 - beta) * Q:

        JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M)

    (the GKD paper's definition and TRL's `GKDTrainer.generalized_jsd_loss`). beta = 0.5 is the
    symmetric JSD, bounded by log 2 at T = 1. The formula itself tends to 0 at both ends;
    JSD(beta) / beta -> forward KL(P || Q) as beta -> 0 and JSD(beta) / (1 - beta) -> reverse
    KL(Q || P) as beta -> 1, so, as in TRL, beta = 0 returns `forward_kl` and beta = 1 returns
    `reverse_kl` exactly (the value jumps in scale at the endpoints: it is not continuous there).
    TRL applies no T^2 factor; pass temperature=1 (GKD's setting) or divide by T^2 to match it.

    Args: as `forward_kl`, plus beta in [0, 1] (a Python float: it selects the endpoint cases).
    Returns: float32 scalar, or [B, T] for 'none'.
    """
    if not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ConfigValueError(f"beta must be a Python number in [0, 1], got {beta!r}.")
    log_ps, log_pt = _log_probs(student, teacher, temperature)
    if beta == 0.0:
        per = kl_divergence(log_pt, log_ps)
    elif beta == 1.0:
        per = kl_divergence(log_ps, log_pt)
    else:
        # log M in log space (stable when both probabilities underflow in linear space). Where
        # both are exactly 0 (-inf logits), logaddexp(-inf, -inf) would put NaN in the gradient.
        none = jnp.isneginf(log_pt) & jnp.isneginf(log_ps)
        log_m = jnp.logaddexp(
            jnp.where(none, 0.0, log_pt + jnp.log(beta)),
            jnp.where(none, 0.0, log_ps + jnp.log1p(-beta)),
        )
        log_m = jnp.where(none, -jnp.inf, log_m)
        per = beta * kl_divergence(log_pt, log_m) + (1.0 - beta) * kl_divergence(log_ps, log_m)
    return reduce_loss(per * temperature**2, mask=mask, reduction=reduction)
