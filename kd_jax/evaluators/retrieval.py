"""Figure <-> spoken-text retrieval on lecture slides (evaluator "lecture_retrieval"; Lee et al.,
arXiv:2208.08080, section 6, Table 2; the released `src/eval.py:i2t/t2i`).

Layout (the released one): the eval split is a list of examples (figure, its slide's spoken
text); the candidates of a speaker are that speaker's examples of the split, so a slide's text
appears once per figure of the slide. S[i, j] = max_k <fig_i, txt_j^k>.

  figure -> text (f2t)  query figure i ranks the texts of all examples j; correct: any example
                        of figure i's slide.
  text -> figure (t2f)  query text j (one per example) ranks all figures i; correct: any figure
                        of its slide.

A query's rank is that of its BEST-ranked correct candidate (a slide counts as retrieved through
any of its figures). Tie rule: rank = #{wrong candidates c : S_c >= max over correct S}, i.e.
a tie with a wrong candidate counts against the query (pessimistic), ties among correct
candidates do not matter. R@k = 100 * mean(rank < k); median rank = floor(median(rank)) + 1;
mean rank = mean(rank) + 1 (the released definitions). Metrics are computed per speaker, then
averaged over speakers, per seed replica.

`as_released` ranking: the released loop never updates `curr_best_ind`, so the rank it keeps is
that of the LAST correct candidate in listing order (here: example order), in the order of a
stable argsort of S reversed (ties: the later index first). Reported as "<metric>_as_released".

Settings (`config.evaluator_kwargs`): `splits` (default ("val", "test"), the eval source's
"split" key 0/1), `as_released` (default True: also the released ranking), `random` (default
False: replace the model's embeddings by random unit vectors, one per figure and K per slide
text, seeded per seed replica; the "Random" row of Table 2),
`per_speaker` (default True: also "<split>/speaker<s>/<dir>_r10").
Metric names: "<split>/<dir>_<r1|r5|r10|medr|meanr>", dir in (f2t, t2f), and "<split>/rsum"
(R@1 + R@5 + R@10 of both directions, the released selection score).
"""

from __future__ import annotations

import jax
import numpy as np

from kd_jax import multihost, sharding
from kd_jax.evaluators import EvalContext, Headline, register
from kd_jax.replicas import over_seeds

DIRECTIONS = ("f2t", "t2f")
METRICS = ("r1", "r5", "r10", "medr", "meanr")


def best_ranks(sim: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based rank per query row of its best correct candidate (module docstring's tie rule).
    sim [Q, C] float, correct [Q, C] bool with >= 1 True per row."""
    sim = np.asarray(sim, np.float64)
    correct = np.asarray(correct, bool)
    if not correct.any(axis=1).all():
        raise ValueError("every query needs at least one correct candidate.")
    best = np.max(np.where(correct, sim, -np.inf), axis=1, keepdims=True)
    return np.sum(~correct & (sim >= best), axis=1)


def released_ranks(sim: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based rank of the LAST correct candidate (column order) per row, in the order of a
    stable argsort of sim reversed: the released `i2t`/`t2i` result (curr_best_ind never
    updated)."""
    sim = np.asarray(sim, np.float64)
    correct = np.asarray(correct, bool)
    q, c = sim.shape
    order = np.argsort(sim, axis=1, kind="stable")[:, ::-1]
    pos = np.empty_like(order)
    pos[np.arange(q)[:, None], order] = np.arange(c)[None, :]
    last = c - 1 - np.argmax(correct[:, ::-1], axis=1)
    return pos[np.arange(q), last]


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks, np.float64)
    return {
        "r1": 100.0 * np.mean(ranks < 1),
        "r5": 100.0 * np.mean(ranks < 5),
        "r10": 100.0 * np.mean(ranks < 10),
        "medr": float(np.floor(np.median(ranks)) + 1),
        "meanr": float(np.mean(ranks) + 1),
    }


def retrieval_metrics(
    sim: np.ndarray,
    slide: np.ndarray,
    speaker: np.ndarray,
    *,
    as_released: bool = True,
    per_speaker: bool = False,
) -> dict[str, float]:
    """Both directions, per speaker then averaged. sim [N, N] (figure i vs text of example j),
    slide and speaker [N] per example."""
    slide, speaker = np.asarray(slide), np.asarray(speaker)
    rankers = {"": best_ranks, **({"_as_released": released_ranks} if as_released else {})}
    per: dict[str, list[float]] = {}
    for spk in np.unique(speaker):
        idx = np.flatnonzero(speaker == spk)
        s = sim[np.ix_(idx, idx)]
        correct = slide[idx][:, None] == slide[idx][None, :]
        for suffix, ranker in rankers.items():
            for direction, mat in (("f2t", s), ("t2f", s.T)):
                for name, v in rank_metrics(ranker(mat, correct)).items():
                    per.setdefault(f"{direction}_{name}{suffix}", []).append(v)
                    if per_speaker and not suffix and name == "r10":
                        per[f"speaker{int(spk)}/{direction}_r10"] = [v]
    out = {k: float(np.mean(v)) for k, v in per.items()}
    for suffix in rankers:
        out[f"rsum{suffix}"] = sum(
            out[f"{d}_{r}{suffix}"] for d in DIRECTIONS for r in ("r1", "r5", "r10")
        )
    return out


def similarity(fig: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """[N, D] x [N, K, D] -> [N, N], max over the K text instances."""
    return np.max(np.einsum("nd,mkd->nmk", fig, txt), axis=-1)


def random_similarity(slide: np.ndarray, k: int, d: int, *, seed: int) -> np.ndarray:
    """S [N, N] of random unit embeddings: one per figure (example) and K per slide text, so a
    slide's duplicated text scores alike, as any text encoder's would (the "random
    embeddings" baseline; i.i.d. random scores per pair would give every duplicate its own
    chance and inflate f2t)."""
    rng = np.random.default_rng(seed)
    fig = rng.normal(size=(len(slide), d))
    _, inverse = np.unique(slide, return_inverse=True)
    txt = rng.normal(size=(inverse.max() + 1, k, d))[inverse]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return similarity(unit(fig), unit(txt))


@register(
    "lecture_retrieval",
    headline=tuple(
        Headline(f"test/{d}_{r}", f"test {d} R@{r[1:]}")
        for d in DIRECTIONS
        for r in ("r1", "r5", "r10")
    )
    + (Headline("test/rsum", "test rsum"),),
)
def lecture_retrieval(ctx: EvalContext):
    splits = tuple(ctx.settings.get("splits", ("val", "test")))
    as_released = bool(ctx.settings.get("as_released", True))
    random = bool(ctx.settings.get("random", False))
    per_speaker = bool(ctx.settings.get("per_speaker", True))

    def one_seed(variables, batch):
        _, feats = ctx.student_predict(variables, batch)
        return {"fig": feats["fig"], "txt": feats["txt"]}

    predict = jax.jit(
        over_seeds(one_seed, (0, None), ctx.seeds_in_step),
        out_shardings=sharding.replicated(ctx.mesh),
    )

    def evaluate(variables, t_vars) -> dict:
        del t_vars
        cols: dict = {k: [] for k in ("fig", "txt", "slide", "speaker", "split", "m")}
        for batch in ctx.batches():
            out = multihost.to_host(predict(variables, batch))
            cols["fig"].append(np.asarray(out["fig"], np.float64))
            cols["txt"].append(np.asarray(out["txt"], np.float64))
            for k in ("slide", "speaker", "split"):
                cols[k].append(np.asarray(multihost.to_host(batch[k])))
            cols["m"].append(np.asarray(multihost.to_host(batch["example_mask"])) > 0)
        keep = np.concatenate(cols["m"])
        fig = np.concatenate(cols["fig"], axis=1)[:, keep]
        txt = np.concatenate(cols["txt"], axis=1)[:, keep]
        slide, speaker, split = (
            np.concatenate(cols[k])[keep] for k in ("slide", "speaker", "split")
        )
        results: dict[str, list[float]] = {}
        for s in range(fig.shape[0]):
            for code, name in enumerate(("val", "test")):
                if name not in splits or not np.any(split == code):
                    continue
                sel = split == code
                if random:
                    sim = random_similarity(slide[sel], txt.shape[2], txt.shape[3], seed=s)
                else:
                    sim = similarity(fig[s][sel], txt[s][sel])
                m = retrieval_metrics(
                    sim,
                    slide[sel],
                    speaker[sel],
                    as_released=as_released,
                    per_speaker=per_speaker,
                )
                for k, v in m.items():
                    results.setdefault(f"{name}/{k}", []).append(v)
        return {k: np.asarray(v, np.float64) for k, v in results.items()}

    return evaluate
