"""Metrics to JSONL and TensorBoard event files (process 0 writes; every process computes)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class MetricWriter:
    """Rows of `stage` appended to `<workdir>/metrics.jsonl` and TensorBoard events (process 0).
    `resume_step`: the stage resumes from that step, so its rows past it (written by the run
    that was stopped after its last checkpoint) are cut from metrics.jsonl first, and TensorBoard
    is told to purge its events past it: every step has one row, from the run that continued."""

    def __init__(self, workdir: str, stage: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.stage = stage
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None:
                _cut(path, stage, resume_step)
            self._jsonl = open(path, "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tb", stage), purge_step=resume_step)

    def write(self, step: int, metrics: dict) -> dict:
        """Per-seed arrays -> mean (+ std and per-seed values in JSONL)."""
        row = {"stage": self.stage, "step": int(step)}
        for key, value in metrics.items():
            v = np.asarray(value, np.float64).reshape(-1)
            row[key] = float(v.mean())
            if v.size > 1:
                row[key + "/std"] = float(v.std())
                row[key + "/seeds"] = v.tolist()
        if self.enabled:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for key, value in row.items():
                    if isinstance(value, float) and not key.endswith("/std"):
                        self._tb.add_scalar(key, value, step)
        return row

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class Clock:
    """Seconds spent training: evaluation and checkpointing are paused out (the state is made
    ready first, so the steps before them are not billed to them)."""

    def __init__(self):
        self.start, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self, state):
        jax.block_until_ready(state)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused_s


def progress_bar(cfg, name: str, start: int, global_batch: int):
    """A tqdm bar in examples (process 0, `config.progress_bar`), or None."""
    if not cfg.progress_bar or jax.process_index() != 0:
        return None
    return tqdm(
        total=cfg.steps * global_batch,
        initial=start * global_batch,
        unit="ex",
        unit_scale=True,
        desc=name,
        mininterval=2.0,
        leave=False,
    )


def _cut(path: str, stage: str, step: int) -> None:
    """Drops the rows of `stage` past `step` from a metrics.jsonl (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill: dropped.
            continue
        if row.get("stage") == stage and int(row.get("step", 0)) > step:
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
