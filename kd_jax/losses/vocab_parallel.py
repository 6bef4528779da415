"""Vocab-parallel fused chunked KD: the LM heads split along V over the mesh's 'model' axis.

`chunked.fused_kd_loss(..., vocab_parallel=True)` (objective kwarg `vocab_parallel=True` of
`chunked_kd` / `chunked_topk_kl`) runs the same token scan as the single-shard path, but inside
each chunk a `jax.shard_map` over the model axis (the batch axes stay automatic) gives every
device the [D, V/m] slice of the student's LM-head kernel (and the teacher's [Dt, V/m] slice),
so it computes only its [B, Tc, V/m] logits. The per-chunk formulas are chunked.py's, read
through `VocabReduce('model')`: the log-softmax is an online logsumexp (local max and sum-exp,
combined by `pmax` / `psum`), every divergence's sum over the vocabulary is a local sum plus a
`psum`, a label's or a cached top-k id's log-prob is gathered from the shard that holds it, and
a dense teacher's top-k is each shard's top-k, all-gathered (m * k candidates), then their top-k.
So the value and gradients are those of the single-shard path, to float32 rounding of the
re-associated sums (tests/test_vocab_parallel.py).

Backward: the same `jax.custom_vjp` as chunked.py. The forward scan accumulates, per device,
dL/d_kernel for its [D, V/m] slice and dL/d_hidden [B, Tc, D] (a `psum` over the model axis of
each shard's dz @ W_slice^T), and the backward only scales them; nothing bigger than
[B, Tc, V/m] per device exists in either pass. Per-device peak memory of the loss therefore
falls about as 1/m (benchmarks/vocab_parallel.py).

Needs mesh.model > 1 (with mesh.model == 1 it is refused: the single-shard path is the same
computation without the collectives) and V divisible by mesh.model. The mesh is the `mesh`
argument or the context mesh (`jax.set_mesh`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kd_jax.errors import ConfigValueError
from kd_jax.losses.chunked import VocabReduce, _chunk_loss_and_grad, _chunks, _Spec, _unchunk

AXIS = "model"


def model_mesh(mesh, vocab_size: int):
    """The mesh the vocab-parallel loss runs over (`mesh`, else the context mesh), checked."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if sizes.get(AXIS, 1) == 1:
        raise ConfigValueError(
            f"vocab_parallel=True needs a mesh with a '{AXIS}' axis of size > 1, got "
            f"{sizes or 'no mesh'}; set mesh.model > 1 (and run under that mesh) or "
            "vocab_parallel=False."
        )
    if vocab_size % sizes[AXIS]:
        raise ConfigValueError(
            f"vocab_parallel=True: vocabulary {vocab_size} is not divisible by mesh.model="
            f"{sizes[AXIS]}; pad the vocabulary or pick a divisor."
        )
    return mesh


def _run(spec: _Spec, mesh, hs, ws, weights, tok, glob, with_grad: bool):
    t = hs.shape[1]
    vocab = VocabReduce(AXIS)
    xs = (
        _chunks(hs, spec.positions),
        _chunks(weights, spec.positions),
        jax.tree.map(lambda a: _chunks(a, spec.positions), tok),
    )
    glob_specs = {k: P(None, AXIS) if k == "t_kernel" else P() for k in glob}

    def local(h, w_l, glob_l, w, tk):
        # One device: h [B, Tc, D] (batch rows as the auto axes have them), w_l [D, V/m].
        w_c = w_l.astype(h.dtype)
        zs = jnp.einsum("...d,dv->...v", h, w_c, preferred_element_type=jnp.float32)
        per, dz = _chunk_loss_and_grad(spec, zs, tk, glob_l, vocab)
        keep = w != 0  # masked tokens count 0 even where their loss is not finite
        value = jnp.sum(jnp.where(keep, per * w, 0.0))
        if not with_grad:
            return value
        dz = jnp.where(keep[..., None], dz * w[..., None], 0.0).astype(h.dtype)
        dh = jnp.einsum("...v,dv->...d", dz, w_c, preferred_element_type=jnp.float32)
        dw = jnp.einsum("btd,btv->dv", h, dz, preferred_element_type=jnp.float32)
        return value, jax.lax.psum(dh, AXIS), dw

    out_specs = (P(), P(), P(None, AXIS)) if with_grad else P()
    chunk = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, AXIS), glob_specs, P(), P()),
        out_specs=out_specs,
        axis_names={AXIS},
    )

    if not with_grad:

        def body(loss, x):
            h, w, tk = x
            return loss + chunk(h, ws, glob, w, tk), None

        return jax.lax.scan(body, jnp.float32(0.0), xs)[0], None, None

    def body_grad(carry, x):
        loss, dws = carry
        h, w, tk = x
        value, dh, dw = chunk(h, ws, glob, w, tk)
        return (loss + value, dws + dw), dh

    init = (jnp.float32(0.0), jnp.zeros(ws.shape, jnp.float32))
    (loss, dws), dhs = jax.lax.scan(body_grad, init, xs)
    return loss, _unchunk(dhs, t), dws


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused(spec: _Spec, mesh, hs, ws, weights, tok, glob):
    """chunked._fused with the vocabulary split over the mesh's model axis."""
    return _run(spec, mesh, hs, ws, weights, tok, glob, with_grad=False)[0]


def _fused_fwd(spec, mesh, hs, ws, weights, tok, glob):
    loss, dhs, dws = _run(spec, mesh, hs, ws, weights, tok, glob, with_grad=True)
    return loss, (dhs, dws)


def _fused_bwd(spec, mesh, res, g):
    del mesh
    dhs, dws = res
    # The teacher side, the weights (mask) and the labels get no gradient (None = zero).
    return (
        (g * dhs).astype(spec.hidden_dtype),
        (g * dws).astype(spec.kernel_dtype),
        None,
        None,
        None,
    )


fused.defvjp(_fused_fwd, _fused_bwd)
