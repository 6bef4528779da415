"""Metrics to JSONL and TensorBoard event files (process 0 writes; every process computes)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm


class MetricWriter:
    def __init__(self, workdir: str, stage: str):
        self.enabled = jax.process_index() == 0
        self.stage = stage
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb", stage))
            except ImportError:  # TensorBoard output is optional; JSONL always works.
                self._tb = None

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
