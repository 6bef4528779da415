"""Per-token value and student-logit gradient of TVD, skew KL / skew reverse KL, AKL, TAID and the
top-k reverse KL, written against normalized log-probs and a vocabulary reduction `vocab` (a
`chunked.VocabReduce`: every sum, max, take and scatter over the vocabulary goes through it, so
the same formula runs on the whole vocabulary or on one shard of it, combined by psum / pmax).
`chunked.fused_kd_loss` uses them (divergence='tvd', ... ; top-k with 'reverse_kl'); the dense
objectives are `kd_jax.losses.llm_divergences` and `kd_jax.losses.topk_rkl` (same definitions,
see there for papers and defaults), against which the tests check these gradients.

Every gradient is dD/ds for s = student logits / tau, through the softmax: with a_j = dD/dq_j,
dD/ds = q * (a - sum_j q_j a_j) (a constant added to every a_j cancels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError

EXTRA = ("tvd", "skew_kl", "skew_reverse_kl", "akl", "taid")
TINY = float(np.finfo(np.float32).tiny)


def _kl_terms(p, log_p, log_q):
    return p * jnp.where(p > 0, log_p - log_q, 0.0)


def _softmax_vjp(q, a, vocab):
    return q * (a - vocab.sum(q * a)[..., None])


def _log_mix(la, lb, weight_a: float):
    none = jnp.isneginf(la) & jnp.isneginf(lb)
    out = jnp.logaddexp(
        jnp.where(none, 0.0, la + np.log(weight_a)), jnp.where(none, 0.0, lb + np.log1p(-weight_a))
    )
    return jnp.where(none, -jnp.inf, out)


def akl_head(lt, mu: float, vocab, iters: int = 48):
    """AKL's head (bool [..., V_local]): the teacher's top tokens up to cumulative probability mu,
    and always its top token, as `llm_divergences.akl_head`, without a sort over the vocabulary
    (which a sharded vocabulary does not allow): the head is {log p >= u*} for the largest
    threshold u* whose upper set holds at most mu of the mass, found by bisection on u with
    `vocab.sum` (48 halvings of [-100, max log p]: below float32 resolution). Equal to the
    sort-based head except for tokens tied in probability at the boundary."""
    p = jnp.exp(lt)
    hi = vocab.max(lt)

    def mass(u):
        return vocab.sum(jnp.where(lt >= u[..., None], p, 0.0))

    # Invariant: mass(lo) > mu >= mass(hi), unless the top token alone exceeds mu (head = it).
    lo = jnp.full_like(hi, -100.0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        small = mass(mid) <= mu
        return jnp.where(small, lo, mid), jnp.where(small, mid, hi)

    top_alone = mass(hi) > mu
    lo, hi_found = jax.lax.fori_loop(0, iters, body, (lo, hi))
    u = jnp.where(top_alone, hi, hi_found)
    return lt >= u[..., None]


def extra_divergence_and_grad(name: str, ls, lt, vocab, *, alpha=0.1, mu=0.5, t=None):
    """(D [...], dD/ds [..., V_local]) for name in EXTRA, from student / teacher log-probs
    [..., V_local]; `alpha` (skew KLs), `mu` (AKL), `t` (TAID, may be traced)."""
    q, p = jnp.exp(ls), jnp.exp(lt)
    if name == "tvd":
        return 0.5 * vocab.sum(jnp.abs(p - q)), _softmax_vjp(q, 0.5 * jnp.sign(q - p), vocab)
    if name == "skew_kl":
        if alpha == 0:  # forward KL
            return vocab.sum(_kl_terms(p, lt, ls)), q - p
        log_m = _log_mix(lt, ls, alpha)
        # dD/dq_j = -(1 - alpha) p_j / M_j.
        a = -(1.0 - alpha) * jnp.where(p > 0, jnp.exp(lt - log_m), 0.0)
        return vocab.sum(_kl_terms(p, lt, log_m)), _softmax_vjp(q, a, vocab)
    if name == "skew_reverse_kl":
        log_m = ls if alpha == 1 else (lt if alpha == 0 else _log_mix(ls, lt, alpha))
        # dD/dq_j = log q_j - log M_j + 1 - alpha q_j / M_j (the 1 cancels).
        ratio = jnp.where(q > 0, jnp.exp(ls - log_m), 0.0)
        a = jnp.where(q > 0, ls - log_m, 0.0) - (alpha * ratio if alpha else 0.0)
        return vocab.sum(_kl_terms(q, ls, log_m)), _softmax_vjp(q, a, vocab)
    if name == "akl":
        head = akl_head(lt, mu, vocab)
        gap = jnp.abs(p - q)
        head_gap, total = vocab.sum(jnp.where(head, gap, 0.0)), vocab.sum(gap)
        g_head = jnp.where(total > 0, head_gap / jnp.where(total > 0, total, 1.0), 0.5)
        g_tail = 1.0 - g_head
        a_r = jnp.where(q > 0, ls - lt, 0.0)
        value = g_head * vocab.sum(_kl_terms(p, lt, ls)) + g_tail * vocab.sum(q * a_r)
        ds = g_head[..., None] * (q - p) + g_tail[..., None] * _softmax_vjp(q, a_r, vocab)
        return value, ds
    if name == "taid":
        none = jnp.isneginf(ls) & jnp.isneginf(lt)
        z = (1.0 - t) * jnp.where(none, 0.0, ls) + t * jnp.where(none, 0.0, lt)
        lr = vocab.log_softmax(jnp.where(none, -jnp.inf, z))
        r = jnp.exp(lr)
        return vocab.sum(_kl_terms(r, lr, ls)), q - r
    raise ConfigValueError(f"Unknown divergence '{name}'; use one of {EXTRA}.")


def topk_reverse_kl_and_grad(ls, idx, logprob, vocab):
    """Per-token reverse KL against the teacher's top-k with a tail bucket (`topk_rkl`), and its
    gradient wrt the student logits s, from the student's log-probs `ls` [..., V_local], global
    top-k ids `idx` [..., k] and their teacher log-probs [..., k].

    With a_i = log q_i - log p_i on the top-k and a_j = log q_tail - log p_tail off it, the
    value is sum_i q_i a_i and dD/ds = q * (a - sum_j q_j a_j). q_tail is a logsumexp of the
    student's log-probs off the top-k (no clamp on the student side); p_tail = 1 - sum_k p is
    floored at the smallest normal float32."""
    q = jnp.exp(ls)
    lp = logprob.astype(jnp.float32)
    in_k = vocab.scatter(ls.shape, idx, jnp.ones_like(lp)) > 0
    has_tail = vocab.sum(jnp.where(in_k, 0.0, 1.0)) > 0
    # Without a tail the logsumexp runs over ls itself (finite), and the term is masked out.
    lq_tail = vocab.logsumexp(jnp.where(has_tail[..., None] & in_k, -jnp.inf, ls))
    lp_tail = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(lp), axis=-1), TINY))
    ls_k = vocab.take(ls, idx)
    q_k = jnp.exp(ls_k)
    a_k = jnp.where(q_k > 0, ls_k - lp, 0.0)
    q_tail = jnp.where(has_tail, jnp.exp(lq_tail), 0.0)
    tail_a = jnp.where(q_tail > 0, lq_tail - lp_tail, 0.0)
    value = jnp.sum(q_k * a_k, axis=-1) + q_tail * tail_a
    a = jnp.where(in_k, vocab.scatter(ls.shape, idx, a_k), tail_a[..., None])
    a = jnp.where(q > 0, a, 0.0)
    return value, _softmax_vjp(q, a, vocab)
