"""Metrics to JSONL and TensorBoard event files (process 0 writes; every process computes)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


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
