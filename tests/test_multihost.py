"""Two processes of 4 CPU devices (gloo collectives) train together; each run is one multi-stage
config of `tests/multihost_configs.py` and must equal a single process of 8 devices running the
same config (params within RUN_RTOL, metrics row by row).

Cells covered (mesh, teacher placement, stage kind), each compared with the one-process run:
  vision:  data=1 x fsdp=8 (fsdp spans the hosts), 2 seeds; kind kd with the teacher
           replicated, sharded (FSDP across both hosts: the case that crashed in
           teacher.fingerprint) and cached; a SIGTERM to process 1 only, in kd_sharded after
           step 3, stops both hosts at that step (exit 143); the newest step is then made
           unreadable on process 1 only, and the rerun of both falls back to step 2 on both;
           `python -m kd_jax.export` reads the workdir both hosts wrote.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker

from kd_jax import export, multihost
from kd_jax.export import cli as export_cli
from tests import helpers, multihost_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "multihost_configs.py")


def _run(name: str, workdir, env_extra=None) -> list[tuple[int, str]]:
    """Config `name` in 2 processes x 4 CPU devices -> [(returncode, output)] per process."""
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    args = [
        sys.executable,
        "-m",
        "kd_jax.main",
        f"--config={CONFIGS}:{name}",
        f"--workdir={workdir}",
    ]
    args += ["--distributed", "--cpu_devices=4", f"--coordinator_address=localhost:{port}"]
    procs = [
        subprocess.Popen(
            [*args, "--num_processes=2", f"--process_id={i}"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=150)[0].decode() for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate()[0].decode()[-3000:] for p in procs]
        raise AssertionError(f"{name} timed out:\n" + "\n---\n".join(outs)) from None
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def assert_same_run(config, multi, single, stages):
    for stage in stages:
        helpers.assert_trees_close(
            helpers.student_params(config, multi, stage),
            helpers.student_params(config, single, stage),
        )
        np.testing.assert_allclose(
            helpers.metrics(multi, stage),
            helpers.metrics(single, stage),
            rtol=helpers.RUN_RTOL,  # the same batch reductions, reordered
        )


def test_vision_matrix_kill_resume_and_export(tmp_path):
    config = multihost_configs.vision()
    multi, single = tmp_path / "multi", tmp_path / "single"
    # 1. A SIGTERM on process 1 alone, after step 3 of kd_sharded: both hosts stop there.
    kill = {multihost.DEBUG_SIGNAL: "kd_sharded:3:1"}
    for rc, out in _run("vision", multi, kill):
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert "stopped by SIGTERM in stage kd_sharded at step 3" in out, out[-3000:]
    # 2. Step 3 unreadable on process 1 only (its own data files truncated): both fall back.
    step3 = multi / "kd_sharded" / "checkpoints" / "3" / "state"
    files = glob.glob(str(step3 / "ocdbt.process_1" / "d" / "*"))
    assert files
    for f in files:
        os.truncate(f, 0)
    runs = _run("vision", multi)
    for rc, out in runs:
        assert rc == 0, out[-3000:]
    assert "hosts disagree on step 3" in runs[0][1] + runs[1][1]
    # 3. The same config in one process of 8 devices, uninterrupted.
    helpers.run(config, single)
    assert_same_run(config, multi, single, config.stage_order)
    # 4. Export reads what both hosts wrote (one process, its own devices).
    out = tmp_path / "npz"
    argv = ["--workdir", str(multi), "--stage", "kd_sharded", "--seed", "1", "--format", "npz"]
    assert export_cli.main([*argv, "--out", str(out)]) == 0
    _, variables = export.load_npz(str(out))
    want = helpers.student_params(config, single, "kd_sharded")
    helpers.assert_trees_close(variables["params"], jax.tree.map(lambda v: v[1], want))
