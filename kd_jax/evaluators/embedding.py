"""Downstream evaluation of sentence encoders (task-agnostic distillation, as MiniLM evaluates it
downstream).

Sentence embeddings are mean-pooled over valid tokens and L2-normalised (sentence-transformers
pooling, `bert.mean_pool` + `bert.normalize`). On held-out ShareGPT (user turn, reply) pairs,
split into a *fit* and an *eval* part (`data.text.sharegpt_pairs`), each model is scored by:

  fidelity (to the teacher, on the eval texts = eval users + eval replies)
    knn_recall@10   for each text, the overlap |N_S(i) ∩ N_T(i)| / 10 of its 10 nearest
                    neighbours (cosine, itself excluded) in the student's own space and in the
                    teacher's; averaged. Width-free.
    cosine_mapped   mean cosine between the teacher's embedding and the student's mapped into the
                    teacher's space by a least-squares linear map (with bias, ridge 0.1) fitted
                    on the fit texts. Width-free; used for every model, the teacher included.
    cosine_raw      plain mean cosine to the teacher; only when the widths agree.
  retrieval_r@1     user turn -> its own reply among 100 candidates (the replies of 100 eval pairs;
                    the eval pairs form len // 100 disjoint groups); averaged over queries.
  probe_accuracy    user-vs-assistant classification of each eval text by a logistic-regression
                    head on the frozen, standardised embeddings (fit texts; L2 1.0 on the summed
                    log-loss, 30 Newton steps). The encoder is not fine-tuned. Balanced: chance 50%.

The metric functions are pure and jitted; `embed` and `evaluate` are the small driver.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data.text import sharegpt_pairs
from kd_jax.errors import ConfigValueError
from kd_jax.models.bert import mean_pool, normalize
from kd_jax.tokenizers import WordPieceTokenizer as Tokenizer

SPLITS = ("fit", "eval")


# -------------------------------------------------------------------- metrics (pure)
def _unit(x):
    return normalize(jnp.asarray(x, jnp.float32))


@jax.jit
def mean_cosine(a, b):
    """Mean cosine similarity of matching rows of a, b [N, D]."""
    return jnp.mean(jnp.sum(_unit(a) * _unit(b), axis=-1))


@functools.partial(jax.jit, static_argnames="k")
def nearest_neighbours(x, *, k: int):
    """[N, D] -> [N, k] indices of each row's k most cosine-similar other rows (itself excluded)."""
    u = _unit(x)
    sim = u @ u.T
    sim = jnp.where(jnp.eye(len(u), dtype=bool), -jnp.inf, sim)
    return jax.lax.top_k(sim, k)[1]


@functools.partial(jax.jit, static_argnames="k")
def knn_recall(student, teacher, *, k: int = 10):
    """Mean over rows of |kNN_student(i) ∩ kNN_teacher(i)| / k, each set in its own space."""
    s, t = nearest_neighbours(student, k=k), nearest_neighbours(teacher, k=k)
    hits = jnp.sum(s[:, :, None] == t[:, None, :], axis=(1, 2))
    return jnp.mean(hits / k)


@jax.jit
def linear_map(x, y, ridge: float = 0.1):
    """Least squares W [D_x + 1, D_y] minimising ||[x, 1] W - y||^2 + ridge ||W||^2."""
    xa = jnp.concatenate([x, jnp.ones((len(x), 1), x.dtype)], axis=1).astype(jnp.float32)
    gram = xa.T @ xa + ridge * jnp.eye(xa.shape[1], dtype=jnp.float32)
    return jnp.linalg.solve(gram, xa.T @ jnp.asarray(y, jnp.float32))


@jax.jit
def mapped_cosine(s_fit, t_fit, s_eval, t_eval):
    """Mean cosine to the teacher after a linear map student -> teacher fitted on the fit split."""
    w = linear_map(s_fit, t_fit)
    pred = jnp.concatenate([s_eval, jnp.ones((len(s_eval), 1), s_eval.dtype)], axis=1) @ w
    return mean_cosine(pred, t_eval)


@functools.partial(jax.jit, static_argnames="group")
def retrieval_recall_at_1(queries, candidates, *, group: int = 100):
    """Row i of `queries` must retrieve row i of `candidates` among the `group` candidates of its
    block (rows [g * group, (g + 1) * group)); N must be a multiple of `group`. -> recall@1."""
    n, d = queries.shape
    if n % group:
        raise ConfigValueError(
            f"{n} pairs is not a multiple of the candidate group size {group}: make the "
            "evaluator's num_eval a multiple of its group."
        )
    q = _unit(queries).reshape(n // group, group, d)
    c = _unit(candidates).reshape(n // group, group, -1)
    best = jnp.argmax(jnp.einsum("gqd,gcd->gqc", q, c), axis=-1)
    return jnp.mean(best == jnp.arange(group)[None, :])


@functools.partial(jax.jit, static_argnames="steps")
def logistic_probe(x_fit, y_fit, x_eval, y_eval, l2: float = 1.0, *, steps: int = 30):
    """Binary logistic regression on standardised features, fitted by Newton's method on the
    L2-penalised summed log-loss (bias unpenalised); -> accuracy on (x_eval, y_eval)."""
    mu, sd = jnp.mean(x_fit, 0), jnp.std(x_fit, 0) + 1e-6

    def design(x):
        z = (jnp.asarray(x, jnp.float32) - mu) / sd
        return jnp.concatenate([z, jnp.ones((len(z), 1), jnp.float32)], axis=1)

    a, y = design(x_fit), jnp.asarray(y_fit, jnp.float32)
    penalty = l2 * jnp.ones(a.shape[1]).at[-1].set(0.0)

    def newton(_, w):
        p = jax.nn.sigmoid(a @ w)
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + jnp.diag(penalty + 1e-6)
        return w - jnp.linalg.solve(hess, grad)

    w = jax.lax.fori_loop(0, steps, newton, jnp.zeros(a.shape[1], jnp.float32))
    pred = (design(x_eval) @ w > 0).astype(jnp.int32)
    return jnp.mean(pred == jnp.asarray(y_eval))


# -------------------------------------------------------------------- driver
@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Tokenised held-out texts: per split, the users then the replies (label 0 then 1)."""

    fit: dict  # input_ids, attention_mask, token_type_ids [2F, T]
    eval: dict  # [2E, T]
    num_fit: int
    num_eval: int

    @staticmethod
    def labels(n: int) -> np.ndarray:
        return np.repeat(np.array([0, 1], np.int32), n)


def heldout_pairs(
    num_fit: int = 500,
    num_eval: int = 500,
    *,
    skip_turns: int = 20000,
    max_length: int = 64,
    tokenizer: str | None = None,
) -> HeldOut:
    """`num_fit + num_eval` held-out ShareGPT pairs after the first `skip_turns` training turns,
    tokenised (teacher WordPiece) and padded to `max_length`."""

    pairs = sharegpt_pairs(num_fit + num_eval, skip_turns=skip_turns)
    tok = Tokenizer(tokenizer, max_length=max_length)

    def encode(ps):
        enc = tok([u for u, _ in ps] + [r for _, r in ps])
        pad = max_length - enc["input_ids"].shape[1]
        return {k: np.pad(v, ((0, 0), (0, pad))) for k, v in enc.items()}

    return HeldOut(encode(pairs[:num_fit]), encode(pairs[num_fit:]), num_fit, num_eval)


@functools.lru_cache(maxsize=16)
def _embed_fn(model):
    @jax.jit
    def fn(params, input_ids, attention_mask, token_type_ids):
        last, _ = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
        return normalize(mean_pool(last, attention_mask))

    return fn


def embed(model, params, enc: dict, batch_size: int = 100) -> np.ndarray:
    """Normalised mean-pooled embeddings [N, D] of tokenised `enc` (one compiled batch shape)."""
    fn, n, out = _embed_fn(model), len(enc["input_ids"]), []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        keys = ("input_ids", "attention_mask", "token_type_ids")
        out.append(np.asarray(fn(params, *(enc[k][idx] for k in keys)))[: n - start])
    return np.concatenate(out)


def evaluate(student: dict, teacher: dict, data: HeldOut, *, k: int = 10, group: int = 100):
    """Scores one model's embeddings {"fit": [2F, D], "eval": [2E, D]} against the teacher's."""
    s_fit, s_ev, t_fit, t_ev = student["fit"], student["eval"], teacher["fit"], teacher["eval"]
    e = data.num_eval
    out = {
        "knn_recall@10" if k == 10 else f"knn_recall@{k}": knn_recall(s_ev, t_ev, k=k),
        "cosine_mapped": mapped_cosine(s_fit, t_fit, s_ev, t_ev),
        "retrieval_r@1": retrieval_recall_at_1(s_ev[:e], s_ev[e:], group=group),
        "probe_accuracy": logistic_probe(
            s_fit, HeldOut.labels(data.num_fit), s_ev, HeldOut.labels(e)
        ),
    }
    if s_ev.shape[1] == t_ev.shape[1]:
        out["cosine_raw"] = mean_cosine(s_ev, t_ev)
    return {name: float(v) for name, v in out.items()}
