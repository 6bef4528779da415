"""Stage kind "mlm": masked-language-model pre-training (BERT, Devlin et al. 2019,
arXiv:1810.04805, Sec. 3.1 and Appendix A.1), e.g. the non-distilled baseline a task-agnostic
distillation method is compared against (MiniLM, arXiv:2002.10957, Sec. 4: students pre-trained
from scratch with MLM). The standard loop (`kd_jax.trainers.kd`) with its seed step given a batch
transform (`kd.make_seed_step(..., transform_batch=...)`) that masks the tokens inside the step.

Masking (BERT's): among the real (attention_mask 1), non-special tokens, each position is chosen
with probability `probability` (15%); a chosen position becomes [MASK] with probability
`mask_fraction` (80%), a token drawn uniformly from the student's vocabulary with probability
`random_fraction` (10%), and stays itself otherwise (10%). Positions are drawn independently
(Bernoulli, as HF's `DataCollatorForLanguageModeling`; the original BERT picks exactly
round(0.15 n) per sequence), so a row may have none.

The masking key is `fold_in(fold_in(key(config.seed), 0x4D4C4D), step)`: a function of the run's
seed and the step only, so a resumed run masks exactly as an uninterrupted one, and the seed
replicas (`num_seeds`) see the same masked batches (they differ in init and dropout, as in the
distillation runs they are compared with).

Config (`config.mlm`, read by this kind only): probability, mask_fraction, random_fraction,
mask_token_id (103 = bert-base-uncased's [MASK]) and special_ids (never chosen; default [PAD] 0,
[CLS] 101, [SEP] 102, [MASK] 103). The batch needs "input_ids" and "attention_mask"; inside the
step the kind replaces
  input_ids  the masked ids,
  label      the original ids [B, T] (what `mlm_ce` predicts),
  mask       float32 [B, T], 1 at the chosen positions (what `mlm_ce` averages over),
so the objective is the standard one: `{"mlm": C.term("mlm_ce")}` on a `bert_mlm` student.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import config as config_lib
from kd_jax.config import MLM_DEFAULTS
from kd_jax.errors import ConfigKeyError, ConfigValueError
from kd_jax.trainers import kd

DEFAULTS = MLM_DEFAULTS  # config.mlm's keys and defaults.
_STREAM = 0x4D4C4D  # "MLM": keeps the masking stream apart from other uses of config.seed.


def settings(cfg) -> dict:
    """`config.mlm` with defaults filled in, validated."""
    s = config_lib.settings(cfg, "mlm", DEFAULTS)
    p, m, r = (float(s[k]) for k in ("probability", "mask_fraction", "random_fraction"))
    if not 0.0 < p <= 1.0:
        raise ConfigValueError(f"mlm.probability must be in (0, 1], got {p}.")
    if m < 0 or r < 0 or m + r > 1.0:
        raise ConfigValueError(
            f"mlm.mask_fraction ({m}) and mlm.random_fraction ({r}) must be >= 0 and sum to at "
            "most 1 (the rest of the chosen tokens stay unchanged)."
        )
    return s


def mask_tokens(
    key,
    input_ids,
    attention_mask,
    *,
    vocab_size: int,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    mask_token_id: int = 103,
    special_ids=(0, 101, 102, 103),
):
    """BERT masking (module docstring). -> (masked ids int32 [B, T], labels = the original ids
    int32 [B, T], mask float32 [B, T] with 1 at the chosen positions)."""
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    k_choose, k_kind, k_token = jax.random.split(key, 3)
    special = jnp.isin(ids, jnp.asarray(tuple(special_ids), jnp.int32))
    eligible = jnp.asarray(attention_mask).astype(bool) & ~special
    chosen = eligible & jax.random.bernoulli(k_choose, probability, ids.shape)
    u = jax.random.uniform(k_kind, ids.shape)
    to_mask = chosen & (u < mask_fraction)
    to_random = chosen & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    random_ids = jax.random.randint(k_token, ids.shape, 0, vocab_size, jnp.int32)
    masked = jnp.where(to_mask, jnp.int32(mask_token_id), jnp.where(to_random, random_ids, ids))
    return masked, ids, chosen.astype(jnp.float32)


def masking_key(seed: int, step):
    """The masking key of (run seed, step) (module docstring)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), _STREAM), step)


def check(stage) -> None:
    """Fails before training when an MLM stage cannot run."""
    name = stage.name
    if not hasattr(getattr(stage.student, "config", None), "vocab_size"):
        raise ConfigValueError(
            f"Stage '{name}': kind 'mlm' needs a student with a vocabulary (config.vocab_size), "
            "e.g. 'bert_mlm'."
        )
    example = stage.data.example_batch()
    missing = [k for k in ("input_ids", "attention_mask") if k not in example]
    if missing:
        raise ConfigKeyError(
            f"Stage '{name}': kind 'mlm' masks batch keys input_ids and attention_mask; dataset "
            f"'{stage.data.name}' gives {sorted(example)}, missing {missing}."
        )


def make_train_step(stage, t_axis, cached: bool):
    """The jitted step: the standard seed step on the masked batch."""
    s = settings(stage.cfg)
    check(stage)
    vocab, seed = int(stage.student.config.vocab_size), int(stage.cfg.seed)
    kwargs = {k: s[k] for k in ("probability", "mask_fraction", "random_fraction")}
    kwargs.update(mask_token_id=int(s["mask_token_id"]), special_ids=tuple(s["special_ids"]))

    def transform(state, batch, rng):
        del rng  # the masking depends on (seed, step) only, not on the replica's stream.
        ids, labels, mask = mask_tokens(
            masking_key(seed, state.step),
            batch["input_ids"],
            batch["attention_mask"],
            vocab_size=vocab,
            **kwargs,
        )
        new = {**batch, "input_ids": ids, "label": labels, "mask": mask}
        return new, {"mlm_tokens": jnp.sum(mask)}

    seed_step = kd.make_seed_step(stage, cached, transform)
    return kd.jit_step(stage, kd.over_batch_seeds(stage, seed_step, t_axis))


kd.register_step_kind("mlm", make_train_step, settings=("mlm",), check=settings)
