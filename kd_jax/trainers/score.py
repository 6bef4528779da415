"""Stage kind "score": a causal LM rates classroom discourse zero-shot (teacher coach; Wang &
Demszky 2023, arXiv:2306.03090), with two readouts per input:

  (a) greedy generation (KV cache, `kd_jax.models.generate`) parsed strictly
      (`kd_jax.prompts.parse`): an unparsable answer is kept, counted and reported, never
      dropped silently;
  (b) the expected rating sum_s s * p(s), p = the next-token distribution renormalised over the
      allowed score tokens ("0".."2", "1".."7", ...; each must be one token): for DA / DA+ right
      after the prompt, for RA after the answer's last "Rating:" (one more forward pass).

Inputs: `score.source` "ncte_uptake" (the vendored uptake exchanges, split by observation as
`kd_jax.data.ncte.uptake_split`) or "ncte" (the user's paper-scale transcripts and CLASS/MQI
ratings, `kd_jax.data.ncte.paper_segments`). The teacher is any `llama` model of the registry:
`teacher.init` "pretrained:smollm2-135m-instruct", "pretrained:gguf:<file>" (a user's llama or
qwen2 GGUF) or "random:<seed>" (tests); prompts use the ChatML chat format of the tokenizer
(`score.tokenizer`: a GGUF path; default the teacher's GGUF, else SmolLM2's).

Records (`kd_jax.data.records`, resumable, checksummed; one shard per batch of one (item,
variant, split)) carry the answer, the parse, p(s), the expected rating, the human ratings and
provenance: teacher id and weight fingerprint, template name and hash, settings. result.json
holds per (item, variant, split) the parse rate and agreement (`kd_jax.evaluators.agreement`),
plus a length-only baseline (teacher-utterance words) for the uptake data; `distribution.png`
is the score-distribution plot (paper Fig. 4 style).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config as config_lib
from kd_jax import models, multihost, prompts
from kd_jax.data import ncte, records
from kd_jax.errors import ConfigValueError, UserFileNotFoundError
from kd_jax.evaluators import agreement
from kd_jax.models.generate import generate as generate_tokens
from kd_jax.models.generate import left_align
from kd_jax.tokenizers import BPETokenizer, find_smollm2_gguf
from kd_jax.trainers import register
from kd_jax.trainers._shards import load_teacher, run_shards, run_stage

SCORE_DEFAULTS = {
    "source": "ncte_uptake",  # or "ncte" (paper-scale transcripts + CLASS/MQI ratings)
    "splits": ("test",),  # ncte_uptake: "train" | "test" | "all" (ncte: "all")
    "limit": 0,  # inputs per split (0 = all)
    "limit_train": -1,  # the train split's limit (-1 = `limit`)
    "limit_ra": 0,  # RA (long answers) on only the first N inputs of each split (0 = limit)
    "train_variants": ("DA",),  # variants scored on the "train" split (distillation targets)
    "generate_splits": ("test",),  # splits answered by generation; others: readout (b) only
    "test_fraction": 0.2,
    "split_seed": 0,
    "items": ("uptake",),
    "variants": ("DA",),
    # The assistant turn starts with this text (DA/DA+: "Rating: ", RA: "Reasoning: "), so the
    # answer and p(score) follow the label; False: the model starts the turn itself.
    "prefill": True,
    "max_new_tokens": 6,  # DA and DA+
    "max_new_tokens_ra": 64,
    "batch_size": 16,
    "max_words": 0,  # words per utterance (uptake) or per segment (ncte); 0 = all
    "tokenizer": "",  # a GGUF path ("" = the teacher's GGUF, else SmolLM2's)
    "transcripts": "",  # ncte: single_utterances.csv
    "class_ratings": "",  # ncte: class_data.csv
    "mqi_ratings": "",  # ncte: mqi_data.csv
    "bootstrap": 1000,  # cluster-bootstrap resamples for the intervals (0 = none)
    "plot": True,
    "seed": 0,
    "fail_after_shards": -1,  # tests: raise after writing this many shards
}


PREFILL = {"DA": "Rating: ", "DA+": "Rating: ", "RA": "Reasoning: "}


def settings(cfg) -> dict:
    s = config_lib.settings(cfg, "score", SCORE_DEFAULTS)
    for k in ("splits", "train_variants", "generate_splits", "items", "variants"):
        s[k] = tuple(s[k]) if not isinstance(s[k], str) else (s[k],)
    for key in ("variants", "train_variants"):
        for v in s[key]:
            if v not in prompts.VARIANTS:
                raise ConfigValueError(f"score.{key}: '{v}' is not one of {prompts.VARIANTS}.")
    if s["source"] not in SOURCE_INPUTS:
        raise ConfigValueError(f"score.source '{s['source']}': use 'ncte_uptake' or 'ncte'.")
    kind, fields = SOURCE_INPUTS[s["source"]]
    other = next(k for k, (v, _) in SOURCE_INPUTS.items() if v != kind)
    for item in s["items"]:  # every prompt template, before any stage runs
        spec = prompts.load(item)
        if spec["input"] != kind:
            raise ConfigValueError(
                f"score.items: item '{item}' scores {spec['input']}s, but score.source="
                f"'{s['source']}' gives {kind}s; use score.source='{other}' or another item."
            )
        for v in dict.fromkeys((*s["variants"], *s["train_variants"])):
            prompts.check_inputs(item, v, fields)
    if s["source"] == "ncte" and s["splits"] != ("all",):
        raise ConfigValueError(
            f"score.splits={s['splits']}: score.source='ncte' scores every segment; set "
            "score.splits=('all',)."
        )
    for key, least in (("batch_size", 1), ("max_new_tokens", 1), ("max_new_tokens_ra", 1)):
        if not isinstance(s[key], int) or s[key] < least:
            raise ConfigValueError(f"score.{key}={s[key]!r}: set it to an integer >= {least}.")
    return s


# score.source -> (the items' input kind, the prompt inputs its records give).
SOURCE_INPUTS = {
    "ncte_uptake": ("exchange", ("student", "teacher")),
    "ncte": ("transcript", ("transcript",)),
}


def tokenizer_path(cfg, s) -> str:
    if s["tokenizer"]:
        return s["tokenizer"]
    preset = str(cfg.teacher.kwargs.get("preset", ""))
    if preset.startswith("gguf:"):
        return preset.split(":", 1)[1]
    return find_smollm2_gguf()


def score_tokens(tok, levels) -> list[int]:
    ids = []
    for s in levels:
        enc = tok.encode(str(s))
        if len(enc) != 1:
            raise ConfigValueError(f"score {s} is {len(enc)} tokens in this tokenizer; need 1.")
        ids.append(enc[0])
    return ids


def inputs_for(s, item: str, split: str) -> list[dict]:
    """[{"key", "obs_id", "fields": {prompt inputs}, "human": {...}, "words"}] of one split."""
    spec = prompts.load(item)
    if s["source"] == "ncte_uptake":
        if spec["input"] != "exchange":
            raise ConfigValueError(f"item '{item}' scores transcripts; use score.source='ncte'.")
        limit = s["limit_train"] if split == "train" and s["limit_train"] >= 0 else s["limit"]
        recs = ncte.uptake_split(
            split, test_fraction=s["test_fraction"], split_seed=s["split_seed"], limit=limit
        )
        return [
            {
                "key": ncte.exchange_key(r),
                "obs_id": r["obs_id"],
                "fields": {
                    "student": _clip(r["student_text"], s["max_words"]),
                    "teacher": _clip(r["teacher_text"], s["max_words"]),
                },
                "human": {
                    "uptake": r["uptake"],
                    "uptake_zscore": r["uptake_zscore"],
                    "label": r["uptake_label"],
                    "raters": r["uptake_raters"],
                },
                "words": len(r["teacher_text"].split()),
            }
            for r in recs
        ]
    if spec["input"] != "transcript":
        raise ConfigValueError(f"item '{item}' scores exchanges; use score.source='ncte_uptake'.")
    if split != "all":
        raise ConfigValueError("score.source='ncte' scores every segment: use splits=('all',).")
    framework = spec["framework"].lower()
    ratings = s["class_ratings"] if framework == "class" else s["mqi_ratings"]
    segs = ncte.paper_segments(s["transcripts"], ratings, framework, max_words=s["max_words"])
    segs = segs[: s["limit"]] if s["limit"] else segs
    return [
        {
            "key": g["key"],
            "obs_id": g["obs_id"],
            "fields": {"transcript": g["transcript"]},
            "human": {"score": g["human"][item], "raters": g["raters"]},
            "words": len(g["transcript"].split()),
        }
        for g in segs
    ]


def _clip(text: str, max_words: int) -> str:
    words = text.split()
    return (
        text if not max_words or len(words) <= max_words else " ".join(words[:max_words]) + " ..."
    )


@functools.partial(jax.jit, static_argnames=("module",))
def _last_logits(variables, ids, mask, *, module):
    ids, mask = left_align(ids, mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, _ = module.apply(
        variables, ids, positions=positions, segment_ids=mask, hidden_only=True
    )
    return module.apply(variables, hidden[:, -1], method=module.logits_from_hidden)


def _pad_left(seqs, width: int, pad_id: int):
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for r, q in enumerate(seqs):
        q = q[-width:]
        ids[r, width - len(q) :], mask[r, width - len(q) :] = q, 1
    return ids, mask


def _width(n: int) -> int:
    return 32 * math.ceil(n / 32)


def score_stage(cfg, ctx) -> dict:
    s = settings(cfg)
    tok_path = tokenizer_path(cfg, s)
    tok = BPETokenizer.from_gguf(tok_path)
    module, variables, ident = load_teacher(cfg, ctx)
    if module.config.vocab_size < tok.vocab_size:
        raise ConfigValueError(
            f"teacher vocabulary {module.config.vocab_size} < tokenizer vocabulary "
            f"{tok.vocab_size} ({tok_path})."
        )
    pad = tok.pad_id if tok.pad_id is not None else 0
    b = int(s["batch_size"])

    jobs = []  # (item, variant, split, [inputs]) batches, in a fixed order: shard i = jobs[i]
    templates = {}
    for item in s["items"]:
        for variant in s["variants"]:
            templates[f"{item}/{variant}"] = prompts.template_hash(item, variant)
            for split in s["splits"]:
                if split == "train" and variant not in s["train_variants"]:
                    continue
                rows = inputs_for(s, item, split)
                if variant == "RA" and s["limit_ra"]:
                    rows = rows[: s["limit_ra"]]
                for i in range(0, len(rows), b):
                    jobs.append((item, variant, split, rows[i : i + b]))
    if not jobs:
        raise ConfigValueError("score: nothing to score (empty splits or limits).")
    provenance = {
        k: s[k]
        for k in (
            "source",
            "splits",
            "limit",
            "limit_train",
            "limit_ra",
            "train_variants",
            "prefill",
            "generate_splits",
            "test_fraction",
            "split_seed",
            "max_new_tokens",
            "max_new_tokens_ra",
            "batch_size",
            "max_words",
            "seed",
        )
    }
    provenance = json.loads(json.dumps(provenance))  # tuples -> lists, as read back
    manifest = {
        "kind": "score",
        "prefix": "scores",
        "num_shards": len(jobs),
        "num_records": sum(len(j[3]) for j in jobs),
        "teacher": ident,
        "tokenizer": os.path.basename(tok_path),
        "templates": templates,
        "settings": provenance,
    }

    def make_shard(i):
        item, variant, split, rows = jobs[i]
        levels = prompts.scale(item)
        allowed = score_tokens(tok, levels)
        texts = [prompts.render(item, variant, **r["fields"]) for r in rows]
        head = PREFILL[variant] if s["prefill"] else ""
        seqs = [
            list(tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True)[0])
            + tok.encode(head)
            for t in texts
        ]
        real = len(seqs)
        seqs += [seqs[0]] * (b - real)  # one batch shape per job kind: pad with the first row
        width = _width(max(len(q) for q in seqs))
        ids, mask = _pad_left(seqs, width, pad)
        generated = split in s["generate_splits"] or variant == "RA"
        answers = [""] * b
        answer_ids = [np.zeros(0, np.int32)] * b
        if generated:
            mnt = s["max_new_tokens_ra"] if variant == "RA" else s["max_new_tokens"]
            out = generate_tokens(
                module,
                variables,
                ids,
                prompt_mask=mask,
                max_new_tokens=mnt,
                stop_tokens=tok.stop_ids,
                pad_id=pad,
            )
            toks, lens, first = multihost.to_host(
                (out["tokens"], out["lengths"], out["first_logits"])
            )
            for r in range(b):
                a = toks[r, : lens[r]].astype(np.int32)
                answer_ids[r] = a
                answers[r] = tok.decode(a)
        if variant == "RA":
            pre = [q + tok.encode(prompts.rating_prefix(a)) for q, a in zip(seqs, answers)]
            ids2, mask2 = _pad_left(pre, _width(max(len(q) for q in pre)), pad)
            logits = multihost.to_host(_last_logits(variables, ids2, mask2, module=module))
        elif generated:
            logits = first
        else:
            logits = multihost.to_host(_last_logits(variables, ids, mask, module=module))
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        sel = np.asarray(jnp.take(logp, jnp.asarray(allowed), axis=-1), np.float64)
        for r in range(real):
            row = rows[r]
            mass = float(np.exp(sel[r]).sum())
            p = np.exp(sel[r] - sel[r].max())
            p = p / p.sum()
            parsed, reason = (
                prompts.parse(answers[r], variant, levels) if generated else (None, "not generated")
            )
            yield {
                "key": row["key"],
                "obs_id": int(row["obs_id"]),
                "item": item,
                "variant": variant,
                "split": split,
                "template": f"{item}/{variant}",
                "template_hash": templates[f"{item}/{variant}"],
                "prompt": texts[r],
                "prompt_tokens": len(seqs[r]),
                "generated": generated,
                "answer": answers[r],
                "answer_ids": answer_ids[r],
                "parsed": -1 if parsed is None else int(parsed),
                "parse_ok": parsed is not None,
                "parse_reason": reason,
                "levels": list(levels),
                "probs": p.astype(np.float32),
                "allowed_mass": mass,
                "expected": float(np.dot(p, levels)),
                "argmax": int(levels[int(np.argmax(p))]),
                "human": row["human"],
                "words": int(row["words"]),
                "teacher": ident,
                "settings": provenance,
                "shard": i,
            }

    out = run_shards(ctx.stage_dir, manifest, lambda i: list(make_shard(i)), s, ctx.stop)
    recs = records.read_dataset(ctx.stage_dir)
    out["records"] = len(recs)
    out["teacher"] = ident
    out["templates"] = templates
    out["metrics"] = summarize(recs, s, ctx.stage_dir)
    return out


def summarize(recs: list[dict], s: dict, directory: str | None = None) -> dict:
    """{"<item>/<variant>/<split>": parse counts + agreement of (b) and of parsed (a)}."""
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["item"], r["variant"], r["split"]), []).append(r)
    metrics, plots = {}, {}
    for (item, variant, split), rs in sorted(groups.items()):
        levels = tuple(rs[0]["levels"])
        obs = np.asarray([r["obs_id"] for r in rs])
        exp = np.asarray([r["expected"] for r in rs])
        arg = np.asarray([r["argmax"] for r in rs])
        if s["source"] == "ncte_uptake":
            human = {
                "uptake": [r["human"]["uptake"] for r in rs],
                "zscore": [r["human"]["uptake_zscore"] for r in rs],
            }
            label = np.asarray([r["human"]["label"] for r in rs])
        else:  # CLASS: rater mean per segment; MQI: one row per rater (paper conventions)
            exp, arg, obs, human, label = _paper_rows(rs, exp, arg, obs)
        m = {"n": len(rs), "mean_allowed_mass": float(np.mean([r["allowed_mass"] for r in rs]))}
        m["expected"] = agreement.agreement(
            exp,
            human,
            obs,
            pred_label=arg if label is not None else None,
            human_label=label,
            levels=levels,
            bootstrap=s["bootstrap"],
        )
        gen = [r for r in rs if r["generated"]]
        if gen:
            ok = [r for r in gen if r["parse_ok"]]
            reasons: dict = {}
            for r in gen:
                if not r["parse_ok"]:
                    reasons[r["parse_reason"]] = reasons.get(r["parse_reason"], 0) + 1
            m["generated"] = len(gen)
            m["parsed"] = len(ok)
            m["parse_rate"] = len(ok) / len(gen)
            m["unparsable"] = reasons
            if len(ok) >= 3 and s["source"] == "ncte_uptake":
                m["parsed_answer"] = agreement.agreement(
                    [r["parsed"] for r in ok],
                    {
                        "uptake": [r["human"]["uptake"] for r in ok],
                        "zscore": [r["human"]["uptake_zscore"] for r in ok],
                    },
                    [r["obs_id"] for r in ok],
                    pred_label=[r["parsed"] for r in ok],
                    human_label=[r["human"]["label"] for r in ok],
                    levels=levels,
                    bootstrap=s["bootstrap"],
                )
            plots[f"{variant} answers"] = [r["parsed"] for r in ok]
        if split in s["generate_splits"]:  # the evaluation split(s), not distillation targets
            plots[f"{variant} argmax p"] = list(arg)
        if s["source"] == "ncte_uptake" and split in s["generate_splits"]:
            plots.setdefault("human", list(label))
            m["length_baseline"] = agreement.agreement(
                [r["words"] for r in rs], human, obs, bootstrap=s["bootstrap"]
            )
        metrics[f"{item}/{variant}/{split}"] = m
    if directory and s["plot"] and plots:
        first_levels = tuple(recs[0]["levels"])
        metrics["plot"] = agreement.plot_distribution(
            os.path.join(directory, "distribution.png"),
            plots,
            first_levels,
            title=f"score distribution: {', '.join(s['items'])}",
        )
    return metrics


def _paper_rows(rs, exp, arg, obs):
    framework = "class" if isinstance(rs[0]["human"]["score"], float | int) else "mqi"
    if framework == "class":
        human = {"score": [r["human"]["score"] for r in rs]}
        label = np.asarray([int(round(h)) if not math.isnan(h) else -1 for h in human["score"]])
        keep = label >= 0
        return (
            exp[keep],
            arg[keep],
            obs[keep],
            {"score": np.asarray(human["score"])[keep]},
            label[keep],
        )
    e, a, o, h = [], [], [], []
    for r, ex, ar, ob in zip(rs, exp, arg, obs):
        for v in r["human"]["score"]:
            e.append(ex), a.append(ar), o.append(ob), h.append(v)
    h = np.asarray(h)
    return np.asarray(e), np.asarray(a), np.asarray(o), {"score": h}, np.rint(h).astype(int)


def preflight(cfg, ctx) -> None:
    """Before any stage runs: names, settings, and (source "ncte") the user's files exist."""
    del ctx
    models.entry(cfg.teacher.model)
    s = settings(cfg)
    if s["source"] == "ncte":
        frameworks = {prompts.load(item)["framework"].lower() for item in s["items"]}
        needed = [("transcripts", ncte.TRANSCRIPT_LAYOUT)]
        needed += [(f"{f}_ratings", ncte.RATING_LAYOUT[f]) for f in sorted(frameworks)]
        for key, layout in needed:
            if not os.path.isfile(s[key]):
                raise UserFileNotFoundError(
                    f"score.{key}: no file at '{s[key]}'; expected {layout}."
                )


@register("score", settings=("score",), preflight=preflight)
def train(cfg, ctx) -> dict:
    return run_stage(score_stage, cfg, ctx)
