"""Stage kinds: a registry of trainers, each run as `trainer(cfg, ctx) -> result dict`.

`cfg` is the stage's resolved config (`kd_jax.config.stage_config`); `ctx` (`RunContext`) holds
the mesh, the run's root workdir, this stage's directory and every stage's resolved config (for
"stage:<name>" sources). The result is written to `<stage_dir>/result.json` by the trainer and
returned to the runner (`kd_jax.runner`), which runs the stages of a config in order.

Built-in kinds: "kd" (the standard distillation loop, `kd_jax.trainers.kd`), "gkd" (GKD's
on-policy distillation), "mlm" (masked-language-model pre-training, `kd_jax.trainers.mlm`),
"generate" (teacher responses with provenance), "topk_cache" (the teacher's top-k logits per
token) and "score" (zero-shot LLM ratings of classroom discourse,
`kd_jax.trainers.score`). A kind declares the free-form config keys it reads
(`settings=("on_policy",)`); the runner rejects a stage that sets another kind's keys, so a
setting is never silently ignored. Register a new kind from anywhere:

    @trainers.register("my_kind")
    def my_kind(cfg, ctx): ...; return {"stage": cfg.stage_name, ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax

from kd_jax import multihost
from kd_jax.errors import Preempted  # noqa: F401  (stage kinds raise it)
from kd_jax.registry import Registry

TRAINERS: Registry[Callable] = Registry("stage kind")


@dataclasses.dataclass(frozen=True)
class RunContext:
    mesh: jax.sharding.Mesh
    root: str  # the run's workdir
    stage_dir: str  # this stage's directory
    stages: Mapping[str, Any]  # stage name -> resolved config, every stage of the run
    # Set by the runner's signal handlers (SIGTERM, SIGINT): a trainer saves and returns
    # {"preempted": True, "step": ...} at its next step boundary.
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


def register(
    name: str,
    fn: Callable | None = None,
    *,
    settings: tuple[str, ...] = (),
    preflight: Callable | None = None,
):
    """Adds a trainer `fn(cfg, ctx) -> dict`; decorator form without `fn`. `settings`: the
    config keys this kind reads and no other kind does. `preflight(cfg, ctx)`: checks the stage
    without training (names, shapes), run for every stage before the first one trains."""
    return TRAINERS.register(name, fn, settings=tuple(settings), preflight=preflight)


def write_result(directory: str, result: dict) -> None:
    """`<directory>/result.json`, written atomically by process 0."""
    if jax.process_index() != 0:
        return
    path = os.path.join(directory, "result.json")
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def read_result(directory: str) -> dict | None:
    """`<directory>/result.json`, or None. A stage is done only if every process sees its
    result (agreed: a file still being written on a shared disk is not a finished stage)."""
    path = os.path.join(directory, "result.json")
    if not multihost.all_true([os.path.isfile(path)], f"{path} exists")[0]:
        return None
    with open(path) as f:
        return json.load(f)


# Built-in kinds register themselves on import.
from kd_jax.trainers import generate, gkd, kd, mlm, score, topk_cache  # noqa: E402, F401
