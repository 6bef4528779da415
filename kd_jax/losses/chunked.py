"""Memory-bounded token-level distillation: the LM head fused with the divergence, chunk by chunk.

`fused_kd_loss` takes the student's final hidden states [B, T, D] and LM-head kernel [D, V]
(and the teacher's hidden [B, T, Dt] + kernel [Dt, V], or the teacher's cached top-k) and never
builds the [B, T, V] logits of either model. The positions are cut into chunks along T (every
row of the batch in each chunk, so a batch axis sharded over devices stays sharded), and a
`lax.scan` computes, for one chunk at a time, both models' logits [B, Tc, V], the per-token loss
and its gradient with respect to the student logits. The scan accumulates the loss, dL/d_kernel
[D, V] and dL/d_hidden [B, Tc, D]. A `jax.custom_vjp` keeps those two gradients as residuals
(the backward pass only scales them by the incoming cotangent), so a training step costs the
same four large matmuls as the naive version (two forward, two backward) while holding only
O(B * Tc * V) logits at a time. Evaluated without differentiation, no gradient is computed.

Per-token loss (float32 inside, whatever the input dtype), for a position whose student logits
are z and teacher logits zt, at temperature tau:
    l = kd_weight * tau^2 * D(softmax(zt / tau), softmax(z / tau)) + ce_weight * CE(z, label)
with D one of 'forward_kl', 'reverse_kl', 'generalized_jsd' (beta), exactly as in
`kd_jax.losses.sequence` (the same T^2 factor, the same beta = 0 / 1 endpoints), or 'tvd',
'skew_kl', 'skew_reverse_kl' (alpha), 'akl' (mu), 'taid' (taid_t) as in
`kd_jax.losses.llm_divergences` (formulas in `kd_jax.losses.chunked_divergences`); CE is at
temperature 1. `divergence='none'` leaves CE alone (chunked SFT). The reduction matches
`reduce_loss`: 'mean' = sum(l * mask) / max(sum(mask), 1), a token-level mean over the masked
tokens of the whole batch; 'sum' = sum(l * mask). 'none' is not offered: a per-token output
would need the backward pass to redo the matmuls.

Teacher top-k (offline cache; see `kd_jax.losses.sparse`): pass `teacher_topk_idx` int [B, T, k]
and `teacher_topk_logprob` float [B, T, k] instead of the teacher hidden/kernel; the divergence is
then the sparse forward KL of `sparse.topk_kl` (tail='renormalize' or 'bucket'), or with
divergence='reverse_kl' the bucket reverse KL of `topk_rkl.topk_reverse_kl` (tail='bucket').

Matmuls: the kernel is cast to the hidden dtype (as `Llama.logits_from_hidden` does), with float32
accumulation; the gradients wrt the kernel accumulate in float32 and are cast to its dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.errors import ConfigValueError
from kd_jax.losses.chunked_divergences import (
    EXTRA,
    extra_divergence_and_grad,
    topk_reverse_kl_and_grad,
)
from kd_jax.losses.llm_divergences import taid_t as _taid_t
from kd_jax.losses.reduce import _align_mask
from kd_jax.losses.registry import register

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", *EXTRA, "none")
TAILS = ("renormalize", "bucket")


@dataclasses.dataclass(frozen=True)
class _Spec:
    divergence: str
    beta: float
    temperature: float
    kd_weight: float
    ce_weight: float
    teacher: str  # "dense" | "topk" | "none"
    tail: str
    positions: int  # positions of every row per chunk
    hidden_dtype: np.dtype
    kernel_dtype: np.dtype
    alpha: float = 0.1  # skew_kl / skew_reverse_kl
    mu: float = 0.5  # akl
    topk: int = 0  # dense teacher: k > 0 reads only its top-k log-probs, as from a cache


# ------------------------------------------------------------------ reductions over the vocabulary
@dataclasses.dataclass(frozen=True)
class VocabReduce:
    """Reductions over the vocabulary (last) axis of per-token arrays [..., V_local].

    Every divergence below reads the vocabulary only through these, so one formula serves both
    paths. axis=None (`WHOLE_VOCAB`): the whole vocabulary is on this device, V_local = V, and a
    reduction is the plain one (`x.sum(-1)`, `jax.nn.log_softmax`). axis='<mesh axis>': inside a
    `shard_map` over that axis, each device holds the contiguous slice of global ids
    [offset, offset + V_local) with offset = axis_index * V_local, and a reduction is the local
    one combined across the shards by `psum` / `pmax` (see `kd_jax.losses.vocab_parallel`).
    Element-wise work (exp, where, q - p) needs nothing: it is the same on every slice.
    """

    axis: str | None = None

    def sum(self, x):
        """sum over the vocabulary: [..., V_local] -> [...]."""
        s = jnp.sum(x, axis=-1)
        return s if self.axis is None else jax.lax.psum(s, self.axis)

    def max(self, x):
        m = jnp.max(x, axis=-1)
        return m if self.axis is None else jax.lax.pmax(m, self.axis)

    def logsumexp(self, x):
        """log sum_j exp(x_j) over the vocabulary (-inf for an all -inf row)."""
        if self.axis is None:
            return jax.nn.logsumexp(x, axis=-1)
        m = jax.lax.stop_gradient(self.max(x))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        return jnp.log(self.sum(jnp.exp(x - m[..., None]))) + m

    def log_softmax(self, z):
        if self.axis is None:
            return jax.nn.log_softmax(z, axis=-1)
        return z - self.logsumexp(z)[..., None]

    def offset(self, v_local: int):
        """The global id of this device's first vocabulary column."""
        return 0 if self.axis is None else jax.lax.axis_index(self.axis) * v_local

    def ids(self, v_local: int):
        """Global ids [V_local] of this device's columns."""
        return jnp.arange(v_local) + self.offset(v_local)

    def take(self, x, idx):
        """x [..., V_local] at global ids idx [..., k] -> [..., k] (every device gets all k)."""
        if self.axis is None:
            return jnp.take_along_axis(x, idx, axis=-1)
        v = x.shape[-1]
        local = idx - self.offset(v)
        inside = (local >= 0) & (local < v)
        got = jnp.take_along_axis(x, jnp.clip(local, 0, v - 1), axis=-1)
        return jax.lax.psum(jnp.where(inside, got, 0.0), self.axis)

    def scatter(self, shape, idx, values):
        """zeros(shape) [..., V_local] with `values` [..., k] added at global ids `idx` [..., k];
        ids on other devices' slices are dropped."""
        if self.axis is None:
            return scatter_last(shape, idx, values)
        v = shape[-1]
        local = idx - self.offset(v)
        inside = (local >= 0) & (local < v)
        return scatter_last(shape, jnp.clip(local, 0, v - 1), jnp.where(inside, values, 0))

    def top_k(self, x, k: int):
        """(values, global ids) [..., k] of the k largest entries over the vocabulary. Sharded:
        each device's local top-k, all-gathered (m * k candidates), then their top-k."""
        vals, idx = jax.lax.top_k(x, k)
        if self.axis is None:
            return vals, idx
        idx = idx + self.offset(x.shape[-1])
        # The all-gather as a psum of one-hot slots: its result is the same on every shard
        # (invariant), which shard_map's replication check can see; `where`, not a product, so
        # a -inf log-prob stays -inf.
        mine = jnp.arange(jax.lax.axis_size(self.axis)) == jax.lax.axis_index(self.axis)

        def gather(a):
            every = jax.lax.psum(jnp.where(mine[:, None], a[..., None, :], 0), self.axis)
            return every.reshape(*a.shape[:-1], -1)  # [..., m * k], shard by shard

        vals, idx = gather(vals), gather(idx)
        vals, pick = jax.lax.top_k(vals, k)
        return vals, jnp.take_along_axis(idx, pick, axis=-1)


WHOLE_VOCAB = VocabReduce()


# ------------------------------------------------------------------ per-chunk loss and gradient
def _xlogy_diff(p, log_p, log_q):
    """p * (log p - log q), 0 where p = 0 (keeps -inf - -inf out)."""
    return jnp.where(p > 0, p * (log_p - log_q), 0.0)


def _softmax_vjp(q, a, vocab: VocabReduce = WHOLE_VOCAB):
    """Gradient wrt the logits s of sum_j f_j(q) with df/dq_j = a_j, q = softmax(s)."""
    return q * (a - vocab.sum(q * a)[..., None])


def divergence_and_grad(name: str, beta: float, ls, lt, vocab: VocabReduce = WHOLE_VOCAB):
    """Per-token D and dD/ds (s = student logits / tau) from normalized log-probs `ls` (student)
    and `lt` (teacher) [..., V_local]; the same formulas (and -inf handling) as
    `kd_jax.losses.sequence`. Every sum over the vocabulary is `vocab.sum` (a psum across the
    shards under `vocab_parallel`), everything else is element-wise."""
    q, p = jnp.exp(ls), jnp.exp(lt)
    if name == "generalized_jsd" and beta == 0.0:
        name = "forward_kl"
    if name == "generalized_jsd" and beta == 1.0:
        name = "reverse_kl"
    if name == "forward_kl":
        return vocab.sum(_xlogy_diff(p, lt, ls)), q - p
    if name == "reverse_kl":
        a = jnp.where(q > 0, ls - lt, 0.0)
        return vocab.sum(q * a), _softmax_vjp(q, a, vocab)
    if name == "generalized_jsd":
        none = jnp.isneginf(lt) & jnp.isneginf(ls)
        log_m = jnp.logaddexp(
            jnp.where(none, 0.0, lt + np.log(beta)), jnp.where(none, 0.0, ls + np.log1p(-beta))
        )
        log_m = jnp.where(none, -jnp.inf, log_m)
        value = beta * vocab.sum(_xlogy_diff(p, lt, log_m)) + (1.0 - beta) * vocab.sum(
            _xlogy_diff(q, ls, log_m)
        )
        # dD/dq_j = (1 - beta) (log q_j - log M_j); the p-side terms do not depend on q.
        a = jnp.where(q > 0, (1.0 - beta) * (ls - log_m), 0.0)
        return value, _softmax_vjp(q, a, vocab)
    raise ConfigValueError(f"Unknown divergence '{name}'; use one of {DIVERGENCES}.")


def scatter_last(shape, idx, values):
    """zeros(shape) with `values` [..., k] added at `idx` [..., k] along the last axis."""
    k, v = idx.shape[-1], shape[-1]
    flat = jax.vmap(lambda i, x: jnp.zeros((v,), values.dtype).at[i].add(x))(
        idx.reshape(-1, k), values.reshape(-1, k)
    )
    return flat.reshape(shape)


def topk_kl_and_grad(
    tail: str, ls, idx, logprob, temperature: float, vocab: VocabReduce = WHOLE_VOCAB
):
    """Sparse forward KL per token and its gradient wrt s = z / tau (see `sparse.topk_kl`).

    ls: student log-probs [..., V_local]; idx: global top-k ids [..., k]; logprob [..., k]."""
    q = jnp.exp(ls)
    ls_k = vocab.take(ls, idx)
    if tail == "renormalize":
        lt = jax.nn.log_softmax(logprob.astype(jnp.float32) / temperature, axis=-1)
        pt = jnp.exp(lt)
        value = jnp.sum(_xlogy_diff(pt, lt, ls_k), -1)
        return value, q - vocab.scatter(ls.shape, idx, pt)
    if tail != "bucket":
        raise ConfigValueError(f"Unknown tail '{tail}'; use one of {TAILS}.")
    lt = logprob.astype(jnp.float32)
    pt = jnp.exp(lt)
    in_k = vocab.scatter(ls.shape, idx, jnp.ones_like(pt)) > 0
    has_tail = vocab.sum(jnp.where(in_k, 0.0, 1.0)) > 0
    p_tail = jnp.where(has_tail, jnp.clip(1.0 - jnp.sum(pt, -1), 0.0, 1.0), 0.0)
    lq_tail = vocab.logsumexp(jnp.where(has_tail[..., None], jnp.where(in_k, -jnp.inf, ls), ls))
    tail_term = jnp.where(p_tail > 0, p_tail * (jnp.log(jnp.maximum(p_tail, 1e-38)) - lq_tail), 0)
    value = jnp.sum(_xlogy_diff(pt, lt, ls_k), -1) + tail_term
    # dD/dq_j = -p_j / q_j in the top-k, -p_tail / q_tail outside; through the softmax that is
    # q - p (top-k) and q - p_tail * q / q_tail (tail).
    tail_grad = jnp.where(in_k, 0.0, q * (p_tail * jnp.exp(-lq_tail))[..., None])
    return value, q - vocab.scatter(ls.shape, idx, pt) - tail_grad


def _chunk_loss_and_grad(spec: _Spec, zs, tok, glob, vocab: VocabReduce = WHOLE_VOCAB):
    """Per-token loss [B, Tc] and its gradient wrt the student logits zs [B, Tc, V_local]
    (glob["t_kernel"] is then the teacher's [Dt, V_local] slice)."""
    tau = spec.temperature
    loss = jnp.zeros(zs.shape[:-1], jnp.float32)
    dz = jnp.zeros_like(zs)
    if spec.divergence != "none":
        ls = vocab.log_softmax(zs / tau)
        t_idx, t_logprob = tok.get("t_idx"), tok.get("t_logprob")
        if spec.teacher == "dense":
            ht = tok["t_hidden"]
            zt = jnp.einsum(
                "...d,dv->...v",
                ht,
                glob["t_kernel"].astype(ht.dtype),
                preferred_element_type=jnp.float32,
            )
        if spec.teacher == "dense" and spec.topk:
            # The teacher's top-k log-probs at T = 1, as `topk_cache` stores them.
            t_logprob, t_idx = vocab.top_k(vocab.log_softmax(zt), spec.topk)
        if spec.teacher == "dense" and not spec.topk:
            lt = vocab.log_softmax(zt / tau)
            if spec.divergence in EXTRA:
                value, ds = extra_divergence_and_grad(
                    spec.divergence, ls, lt, vocab, alpha=spec.alpha, mu=spec.mu,
                    t=glob.get("taid_t"),
                )  # fmt: skip
            else:
                value, ds = divergence_and_grad(spec.divergence, spec.beta, ls, lt, vocab)
        elif spec.divergence == "reverse_kl":
            value, ds = topk_reverse_kl_and_grad(ls, t_idx, t_logprob, vocab)
        else:
            value, ds = topk_kl_and_grad(spec.tail, ls, t_idx, t_logprob, tau, vocab)
        loss = loss + (spec.kd_weight * tau**2) * value
        dz = dz + (spec.kd_weight * tau) * ds  # d/dz = (1 / tau) d/ds
    if spec.ce_weight:
        lz = vocab.log_softmax(zs)
        labels = tok["labels"][..., None]
        loss = loss - spec.ce_weight * vocab.take(lz, labels)[..., 0]
        onehot = vocab.ids(zs.shape[-1]) == labels
        dz = dz + spec.ce_weight * (jnp.exp(lz) - onehot)
    return loss, dz


# ------------------------------------------------------------------ the scan and its custom VJP
def _chunks(x, n: int):
    """[B, T, ...] -> [T / n (padded up), B, n, ...] (zero padding)."""
    b, t = x.shape[:2]
    pad = -t % n
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, (t + pad) // n, n, *x.shape[2:]), 1, 0)


def _unchunk(x, t: int):
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _run(spec: _Spec, hs, ws, weights, tok, glob, with_grad: bool):
    t = hs.shape[1]
    w_c = ws.astype(hs.dtype)
    xs = (
        _chunks(hs, spec.positions),
        _chunks(weights, spec.positions),
        jax.tree.map(lambda a: _chunks(a, spec.positions), tok),
    )

    def chunk(h, w, tk):
        zs = jnp.einsum("...d,dv->...v", h, w_c, preferred_element_type=jnp.float32)
        per, dz = _chunk_loss_and_grad(spec, zs, tk, glob)
        keep = w != 0  # masked tokens count 0 even where their loss is not finite
        dz = jnp.where(keep[..., None], dz * w[..., None], 0.0)
        return jnp.sum(jnp.where(keep, per * w, 0.0)), dz

    if not with_grad:

        def body(loss, x):
            return loss + chunk(*x)[0], None

        return jax.lax.scan(body, jnp.float32(0.0), xs)[0], None, None

    def body_grad(carry, x):
        loss, dws = carry
        h = x[0]
        value, dz = chunk(*x)
        dz = dz.astype(h.dtype)
        dh = jnp.einsum("...v,dv->...d", dz, w_c, preferred_element_type=jnp.float32)
        dws = dws + jnp.einsum("btd,btv->dv", h, dz, preferred_element_type=jnp.float32)
        return (loss + value, dws), dh

    init = (jnp.float32(0.0), jnp.zeros(ws.shape, jnp.float32))
    (loss, dws), dhs = jax.lax.scan(body_grad, init, xs)
    return loss, _unchunk(dhs, t), dws


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, hs, ws, weights, tok, glob):
    return _run(spec, hs, ws, weights, tok, glob, with_grad=False)[0]


def _fused_fwd(spec, hs, ws, weights, tok, glob):
    loss, dhs, dws = _run(spec, hs, ws, weights, tok, glob, with_grad=True)
    return loss, (dhs, dws)


def _fused_bwd(spec, res, g):
    dhs, dws = res
    # The teacher side, the weights (mask) and the labels get no gradient (None = zero).
    return (
        (g * dhs).astype(spec.hidden_dtype),
        (g * dws).astype(spec.kernel_dtype),
        None,
        None,
        None,
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


# ------------------------------------------------------------------ public functions
def _as_btd(x, name: str):
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ConfigValueError(f"{name} must be [..., T, D], got shape {tuple(x.shape)}.")
    return x.reshape(-1, *x.shape[-2:]) if x.ndim != 3 else x


def fused_kd_loss(
    *,
    student_hidden,
    student_kernel,
    teacher_hidden=None,
    teacher_kernel=None,
    teacher_topk_idx=None,
    teacher_topk_logprob=None,
    labels=None,
    mask=None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    tail: str = "renormalize",
    reduction: str = "mean",
    chunk_size: int = 2048,
    alpha: float = 0.1,
    mu: float = 0.5,
    taid_t=None,
    teacher_topk: int = 0,
    vocab_parallel: bool = False,
    mesh=None,
):
    """Chunked, fused LM head + token-level divergence (+ CE); see the module docstring.

    Args:
      student_hidden: [B, T, D] (or [T, D]); the LM head's input (Llama features["hidden"]).
      student_kernel: [D, V] (Llama features["lm_head"]).
      teacher_hidden, teacher_kernel: [B, T, Dt], [Dt, V]; no gradient flows to them.
      teacher_topk_idx, teacher_topk_logprob: [B, T, k] instead of the teacher hidden/kernel.
      labels: int [B, T] next-token ids, needed when ce_weight != 0.
      mask: 0/1 [B, T] (or [B]); 1 = the position's next-token prediction counts.
      divergence: 'forward_kl' | 'reverse_kl' | 'generalized_jsd' (with `beta`) | 'tvd' |
        'skew_kl' | 'skew_reverse_kl' (with `alpha` in [0, 1)) | 'akl' (with `mu` in (0, 1)) |
        'taid' (with `taid_t`, TAID's t in [0, 1], a number or traced scalar) | 'none'; a top-k
        teacher takes 'forward_kl' or 'reverse_kl' (tail='bucket').
      temperature: tau > 0 (a Python number); the divergence is taken at tau and times tau^2.
      kd_weight, ce_weight: l = kd_weight * tau^2 * D + ce_weight * CE.
      tail: top-k teacher only, 'renormalize' or 'bucket' (see `sparse.topk_kl`).
      reduction: 'mean' (token-level mean over the mask) or 'sum'.
      chunk_size: about this many tokens per chunk: ceil(chunk_size / B) positions of every
        row. Peak memory is a few [chunk, V] float32 buffers; bigger chunks are faster.
      teacher_topk: dense teacher only; k > 0 keeps only its top-k log-probs (at T = 1, as
        `topk_cache` stores them) and takes the top-k form of `divergence` with `tail`, the
        same value as from a cache of them.
      vocab_parallel: split V over the mesh's 'model' axis (`kd_jax.losses.vocab_parallel`):
        each device computes only its [chunk, V / m] logits, with the same value and
        gradients. Needs mesh.model > 1 and V divisible by it.
      mesh: the Mesh for vocab_parallel (default: the context mesh, `jax.set_mesh`).

    Returns: float32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ConfigValueError(
            f"fused_kd_loss supports reduction 'mean' or 'sum', got '{reduction}'."
        )
    if divergence not in DIVERGENCES:
        raise ConfigValueError(f"Unknown divergence '{divergence}'; use one of {DIVERGENCES}.")
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise ConfigValueError(f"temperature must be a Python number > 0, got {temperature!r}.")
    if not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ConfigValueError(f"beta must be a Python number in [0, 1], got {beta!r}.")
    if tail not in TAILS:
        raise ConfigValueError(f"Unknown tail '{tail}'; use one of {TAILS}.")
    if not isinstance(alpha, int | float) or not 0.0 <= alpha < 1.0:
        raise ConfigValueError(f"alpha must be a Python number in [0, 1), got {alpha!r}.")
    if not isinstance(mu, int | float) or not 0.0 < mu < 1.0:
        raise ConfigValueError(f"mu must be a Python number in (0, 1), got {mu!r}.")
    if divergence == "taid" and taid_t is None:
        raise ConfigValueError("divergence 'taid' needs taid_t (see llm_divergences.taid_t).")
    hs, ws = _as_btd(student_hidden, "student_hidden"), jnp.asarray(student_kernel)
    lead = tuple(hs.shape[:2])
    if ws.ndim != 2 or ws.shape[0] != hs.shape[-1]:
        raise ConfigValueError(
            f"student kernel {tuple(ws.shape)} does not map hidden size {hs.shape[-1]} to a "
            "vocabulary; expected [D, V]."
        )
    tok, glob, teacher = {}, {}, "none"
    if divergence != "none":
        if teacher_hidden is not None and teacher_kernel is not None:
            teacher = "dense"
            ht, wt = _as_btd(teacher_hidden, "teacher_hidden"), jnp.asarray(teacher_kernel)
            if wt.ndim != 2 or wt.shape[0] != ht.shape[-1]:
                raise ConfigValueError(f"teacher kernel {tuple(wt.shape)} is not [Dt, V].")
            if wt.shape[-1] != ws.shape[-1]:
                raise ConfigValueError(
                    f"student vocabulary {ws.shape[-1]} != teacher vocabulary {wt.shape[-1]} "
                    f"(LM-head kernels {tuple(ws.shape)} vs {tuple(wt.shape)}); see "
                    "sequence.vocab_check."
                )
            if tuple(ht.shape[:2]) != lead:
                raise ConfigValueError(
                    f"teacher hidden {tuple(ht.shape)} vs student {tuple(hs.shape)}."
                )
            tok["t_hidden"] = jax.lax.stop_gradient(ht)
            glob["t_kernel"] = jax.lax.stop_gradient(wt)
            if divergence == "taid":
                glob["taid_t"] = jax.lax.stop_gradient(jnp.asarray(taid_t, jnp.float32))
            if not isinstance(teacher_topk, int) or not 0 <= teacher_topk <= wt.shape[-1]:
                raise ConfigValueError(
                    f"teacher_topk must be an int in [0, V={wt.shape[-1]}], got {teacher_topk!r}."
                )
            if teacher_topk:
                _check_topk(divergence, tail, temperature)
        elif teacher_topk_idx is not None and teacher_topk_logprob is not None:
            teacher = "topk"
            idx = jnp.asarray(teacher_topk_idx).astype(jnp.int32).reshape(*lead, -1)
            lp = jnp.asarray(teacher_topk_logprob).astype(jnp.float32).reshape(*lead, -1)
            _check_topk(divergence, tail, temperature)
            tok["t_idx"], tok["t_logprob"] = idx, jax.lax.stop_gradient(lp)
        else:
            raise ConfigValueError(
                f"divergence '{divergence}' needs teacher_hidden + teacher_kernel or "
                "teacher_topk_idx + teacher_topk_logprob."
            )
    if ce_weight:
        if labels is None:
            raise ConfigValueError("ce_weight != 0 needs `labels` (next-token ids [B, T]).")
        tok["labels"] = jnp.asarray(labels).astype(jnp.int32).reshape(lead)
    m = jnp.ones(lead, jnp.float32) if mask is None else _align_mask(mask, lead)
    weights = m / jnp.maximum(jnp.sum(m), 1.0) if reduction == "mean" else m
    spec = _Spec(
        divergence,
        float(beta),
        float(temperature),
        float(kd_weight),
        float(ce_weight),
        teacher,
        tail,
        max(1, -(-int(chunk_size) // lead[0])),
        jnp.dtype(hs.dtype),
        jnp.dtype(ws.dtype),
        float(alpha),
        float(mu),
        int(teacher_topk) if teacher == "dense" else 0,
    )
    weights = jax.lax.stop_gradient(weights)
    if vocab_parallel:
        # Imported here: vocab_parallel builds on this module's spec and per-chunk formulas.
        from kd_jax.losses import vocab_parallel as vp

        return vp.fused(spec, vp.model_mesh(mesh, ws.shape[-1]), hs, ws, weights, tok, glob)
    return _fused(spec, hs, ws, weights, tok, glob)


def _check_topk(divergence: str, tail: str, temperature) -> None:
    if tail == "bucket" and temperature != 1:
        raise ConfigValueError("tail='bucket' needs temperature=1 (the tail mass is at T=1).")
    if divergence not in ("forward_kl", "reverse_kl"):
        raise ConfigValueError(
            f"a top-k teacher takes divergence 'forward_kl' or 'reverse_kl', got '{divergence}'."
        )
    if divergence == "reverse_kl" and tail != "bucket":
        raise ConfigValueError(
            "top-k reverse KL needs tail='bucket': a teacher renormalised over its "
            "top-k has no tail mass, so the reverse KL would be infinite."
        )


def _pair(x, who: str):
    if not isinstance(x, tuple | list) or len(x) != 2:
        raise ConfigValueError(
            f"{who} must be a (hidden [B, T, D], lm_head kernel [D, V]) pair; set the term's "
            f"{who}=('hidden', 'lm_head')."
        )
    return x


@register("chunked_kd", token_level=True)
def chunked_kd(
    *,
    student,
    teacher=None,
    labels=None,
    mask=None,
    reduction: str = "mean",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 0.0,
    chunk_size: int = 2048,
    alpha: float = 0.1,
    mu: float = 0.5,
    t_start: float = 0.4,
    t_end: float = 1.0,
    schedule: str | None = None,
    step=None,
    teacher_topk: int = 0,
    tail: str = "renormalize",
    vocab_parallel: bool = False,
):
    """Objective form of `fused_kd_loss` for config terms.

    student: (hidden [B, T, D], kernel [D, V]), e.g. term student=("hidden", "lm_head").
    teacher: (hidden [B, T, Dt], kernel [Dt, V]) (teacher=("hidden", "lm_head")), or None with
      divergence='none'. labels (batch["label"], next-token ids) only for ce_weight != 0.
    Same value as sequence.<divergence>(logits) (or llm_divergences.<divergence>) +
    ce_weight * ce(logits, labels) with the same mask and 'mean' reduction, without building
    [B, T, V]. alpha, mu, and TAID's t_start / t_end / schedule (with the training step, which
    the composer passes) as in `llm_divergences`. teacher_topk = k > 0 (with `tail`) compares
    against the teacher's top-k only. vocab_parallel=True splits V over the mesh's model axis
    (`kd_jax.losses.vocab_parallel`; the step must run under the mesh, `jax.set_mesh`).
    """
    hs, ws = _pair(student, "student")
    ht = wt = None
    if teacher is not None:
        ht, wt = _pair(teacher, "teacher")
    return fused_kd_loss(
        student_hidden=hs,
        student_kernel=ws,
        teacher_hidden=ht,
        teacher_kernel=wt,
        labels=labels,
        mask=mask,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        ce_weight=ce_weight,
        reduction=reduction,
        chunk_size=chunk_size,
        alpha=alpha,
        mu=mu,
        taid_t=_taid_t(t_start, t_end, schedule, step) if divergence == "taid" else None,
        teacher_topk=teacher_topk,
        tail=tail,
        vocab_parallel=vocab_parallel,
    )


@register("chunked_topk_kl", token_level=True)
def chunked_topk_kl(
    *,
    student,
    teacher,
    mask=None,
    reduction: str = "mean",
    temperature: float = 1.0,
    tail: str = "renormalize",
    chunk_size: int = 2048,
    divergence: str = "forward_kl",
    vocab_parallel: bool = False,
):
    """Sparse top-k KL (`sparse.topk_kl`) with the student LM head applied chunk by chunk;
    divergence='reverse_kl' (with tail='bucket') is `topk_rkl.topk_reverse_kl`.

    student: (hidden, kernel); teacher: (top-k idx [B, T, k], top-k log-probs [B, T, k]), e.g.
    teacher=("batch:teacher_topk_idx", "batch:teacher_topk_logprob").
    """
    hs, ws = _pair(student, "student")
    idx, lp = teacher
    return fused_kd_loss(
        student_hidden=hs,
        student_kernel=ws,
        teacher_topk_idx=idx,
        teacher_topk_logprob=lp,
        mask=mask,
        divergence=divergence,
        temperature=temperature,
        tail=tail,
        reduction=reduction,
        chunk_size=chunk_size,
        vocab_parallel=vocab_parallel,
    )
