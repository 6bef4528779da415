"""Agreement between model ratings and human ratings (teacher coach, arXiv:2306.03090).

NumPy only: Spearman's rho (Pearson on average ranks, ties averaged), Pearson's r, Cohen's kappa
(unweighted or quadratic) on the rating levels, and 95% intervals from a cluster bootstrap that
resamples observations (`obs_id`) with replacement, keeping each observation's exchanges
together (exchanges of one lesson are not independent). A statistic that is undefined on a
resample (a constant vector) is skipped; the interval uses the defined ones.

Conventions of the paper for its own data (`kd_jax.data.ncte.paper_segments`): CLASS compares
the model's score with the rater-averaged segment score; MQI compares it with each rater's row
(a segment rated by two raters counts twice). On the uptake data the human rating is the rater
mean (`uptake`), its z-score version (`uptake_zscore`, the uptake paper's target) and, for kappa,
the mean rounded half up to 0/1/2.

Evaluator "rating_agreement" (students of configs/teacher_coach/uptake.py): the student's expected
rating sum_s s * softmax(logits)_s and its argmax, against the batch's `uptake`,
`uptake_zscore`, `label` and `obs_id`; settings (`config.evaluator_kwargs`): `levels` (default
(0, 1, 2)), `bootstrap` (resamples, default 200; 0 = no intervals), `first_n` (also report
"eval/first<n>/..." on the first n eval exchanges: the ones a score stage with limit=n rated).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import multihost, sharding
from kd_jax.evaluators import EvalContext, Headline, register
from kd_jax.replicas import over_seeds


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def spearman(x, y) -> float:
    return pearson(rankdata(x), rankdata(y))


def cohen_kappa(a, b, levels, weights: str | None = None) -> float:
    """Cohen's kappa of two raters' labels over `levels`; weights None or "quadratic"."""
    idx = {v: i for i, v in enumerate(levels)}
    k = len(levels)
    conf = np.zeros((k, k), np.float64)
    for u, v in zip(a, b):
        conf[idx[int(u)], idx[int(v)]] += 1
    n = conf.sum()
    if n == 0:
        return math.nan
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) / max(k - 1, 1)) ** 2
    else:
        raise ValueError(f"weights must be None or 'quadratic', got {weights!r}.")
    expected = np.outer(conf.sum(1), conf.sum(0)) / n
    den = (w * expected).sum()
    return float(1.0 - (w * conf).sum() / den) if den > 0 else math.nan


def cluster_bootstrap(stat, arrays, clusters, *, n: int = 1000, seed: int = 0, alpha=0.05):
    """(lo, hi) percentile interval of `stat(*arrays)` over resampled clusters."""
    clusters = np.asarray(clusters)
    ids, inverse = np.unique(clusters, return_inverse=True)
    members = [np.nonzero(inverse == c)[0] for c in range(len(ids))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(ids), len(ids))
        rows = np.concatenate([members[c] for c in pick])
        v = stat(*(np.asarray(a)[rows] for a in arrays))
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def agreement(
    pred,
    human: dict,
    clusters,
    *,
    pred_label=None,
    human_label=None,
    levels=(0, 1, 2),
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics of a model's scores `pred` [N] against `human` {name: [N] (nan = missing)}:
    spearman_<name>, pearson_<name> and their `_ci` (cluster-bootstrap 95%), and, with
    `pred_label`/`human_label` (ints in `levels`), kappa and kappa_quadratic. `n` = N."""
    pred = np.asarray(pred, np.float64)
    out: dict = {"n": int(len(pred))}
    for name, h in human.items():
        h = np.asarray(h, np.float64)
        ok = ~np.isnan(h) & ~np.isnan(pred)
        for stat_name, stat in (("spearman", spearman), ("pearson", pearson)):
            key = f"{stat_name}_{name}"
            out[key] = stat(pred[ok], h[ok])
            if bootstrap:
                out[key + "_ci"] = cluster_bootstrap(
                    stat, (pred[ok], h[ok]), np.asarray(clusters)[ok], n=bootstrap, seed=seed
                )
    if pred_label is not None and human_label is not None:
        out["kappa"] = cohen_kappa(pred_label, human_label, levels)
        out["kappa_quadratic"] = cohen_kappa(pred_label, human_label, levels, "quadratic")
        out["accuracy"] = float(np.mean(np.asarray(pred_label) == np.asarray(human_label)))
    return out


def plot_distribution(path: str, series: dict, levels, *, title: str = "") -> str:
    """Paper Fig. 4 style: for each named series of ratings (e.g. "human", "DA", "RA"), the
    fraction of each level, as grouped bars; written as a PNG."""
    import matplotlib  # noqa: PLC0415  (optional: only for report plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    levels = list(levels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(levels) * max(1, len(series)) / 2, 3.2))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        values = np.asarray([v for v in values if v is not None and not np.isnan(v)])
        frac = [float(np.mean(values == lv)) if len(values) else 0.0 for lv in levels]
        xs = np.arange(len(levels)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, frac, width, label=f"{name} (n={len(values)})")
    ax.set_xticks(np.arange(len(levels)), [str(lv) for lv in levels])
    ax.set_xlabel("rating")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@register(
    "rating_agreement",
    headline=(
        Headline("eval/spearman_uptake", "ρ vs mean rating"),
        Headline("eval/spearman_zscore", "ρ vs z-score"),
        Headline("eval/kappa", "κ"),
        Headline("eval/kappa_quadratic", "κ quadratic"),
    ),
)
def rating_agreement(ctx: EvalContext):
    levels = tuple(ctx.settings.get("levels", (0, 1, 2)))
    n_boot = int(ctx.settings.get("bootstrap", 200))
    first_n = int(ctx.settings.get("first_n", 0))
    lv = jnp.asarray(levels, jnp.float32)

    def one_seed(variables, batch):
        logits, _ = ctx.student_predict(variables, batch)
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return {"expected": p @ lv, "argmax": jnp.argmax(p, axis=-1)}

    predict = jax.jit(
        over_seeds(one_seed, (0, None), ctx.seeds_in_step),
        out_shardings=sharding.replicated(ctx.mesh),
    )

    def evaluate(variables, t_vars) -> dict:
        del t_vars
        cols: dict = {k: [] for k in ("expected", "argmax", "uptake", "z", "label", "obs", "m")}
        for batch in ctx.batches():
            out = multihost.to_host(predict(variables, batch))
            cols["expected"].append(np.asarray(out["expected"]))
            cols["argmax"].append(np.asarray(out["argmax"]))
            for k, src in (("uptake", "uptake"), ("z", "uptake_zscore"), ("label", "label")):
                cols[k].append(np.asarray(multihost.to_host(batch[src])))
            cols["obs"].append(np.asarray(multihost.to_host(batch["obs_id"])))
            cols["m"].append(np.asarray(multihost.to_host(batch["example_mask"])) > 0)
        keep = np.concatenate(cols["m"])
        exp = np.concatenate(cols["expected"], axis=1)[:, keep]
        arg = np.concatenate(cols["argmax"], axis=1)[:, keep]
        human = {
            "uptake": np.concatenate(cols["uptake"])[keep],
            "zscore": np.concatenate(cols["z"])[keep],
        }
        label = np.concatenate(cols["label"])[keep]
        obs = np.concatenate(cols["obs"])[keep]
        out = {}
        subsets = [("eval", len(label))] + ([(f"eval/first{first_n}", first_n)] if first_n else [])
        for prefix, n in subsets:
            per_seed = [
                agreement(
                    exp[s, :n],
                    {k: v[:n] for k, v in human.items()},
                    obs[:n],
                    pred_label=np.asarray(levels)[arg[s, :n]],
                    human_label=label[:n],
                    levels=levels,
                    bootstrap=n_boot,
                    seed=s,
                )
                for s in range(exp.shape[0])
            ]
            for key in per_seed[0]:
                vals = [r[key] for r in per_seed]
                if key.endswith("_ci"):
                    out[f"{prefix}/{key}_lo"] = np.asarray([v[0] for v in vals])
                    out[f"{prefix}/{key}_hi"] = np.asarray([v[1] for v in vals])
                else:
                    out[f"{prefix}/{key}"] = np.asarray(vals, np.float64)
        return out

    return evaluate
