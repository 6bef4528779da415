"""Two processes of 4 CPU devices (gloo collectives) train together; each run is one multi-stage
config of `tests/multihost_configs.py` and must equal a single process of 8 devices running the
same config (params within RUN_RTOL, metrics row by row).

Cells covered (mesh, teacher placement, stage kind), each compared with the one-process run:
  vision:  data=1 x fsdp=8 (fsdp spans the hosts), 2 seeds; kind kd with the teacher
           replicated, sharded (FSDP across both hosts: the case that crashed in
           teacher.fingerprint), cached and on a sub-mesh (2 devices per host, the student's
           fsdp=4 across both); a SIGTERM to process 1 only, in kd_sharded after step 3, stops
           both hosts at that step (exit 143), and the rerun resumes (with KD_JAX_SLOW=1 the
           newest step is first made unreadable on process 1 only: both fall back to step 2);
           `python -m kd_jax.export` reads the workdir both hosts wrote.
  llm:     model=8 (the model axis spans the hosts; Llama's tensor-parallel rules; the batch
           whole on each host): kinds topk_cache (records byte-identical), gkd (params, metrics:
           the student samples under the model axis) and score (records byte-identical, the
           agreement metrics equal).
"""

from __future__ import annotations

import filecmp
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
ONE_HOST_CORRUPT = os.environ.get("KD_JAX_SLOW") == "1"


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
        outs = [p.communicate(timeout=600)[0].decode() for p in procs]
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
    # 2. The rerun resumes. With KD_JAX_SLOW=1, step 3 is first made unreadable on process 1
    # only (its own data files truncated) and both hosts must fall back to step 2. Known issue:
    # that resume hung in 2 of 5 pytest runs here (0 of 10 outside pytest), after both hosts
    # had agreed on step 2 (see README).
    if ONE_HOST_CORRUPT:
        step3 = multi / "kd_sharded" / "checkpoints" / "3" / "state"
        files = glob.glob(str(step3 / "ocdbt.process_1" / "d" / "*"))
        assert files
        for f in files:
            os.truncate(f, 0)
    runs = _run("vision", multi)
    for rc, out in runs:
        assert rc == 0, out[-3000:]
    if ONE_HOST_CORRUPT:
        assert "hosts disagree on step 3" in runs[0][1] + runs[1][1]
    # 3. The same config in one process of 8 devices, uninterrupted.
    helpers.run(multihost_configs.vision(**{"stages.kd_submesh.teacher.devices": "last:4"}), single)
    assert_same_run(config, multi, single, config.stage_order)
    # 4. Export reads what both hosts wrote (one process, its own devices).
    out = tmp_path / "npz"
    argv = ["--workdir", str(multi), "--stage", "kd_sharded", "--seed", "1", "--format", "npz"]
    assert export_cli.main([*argv, "--out", str(out)]) == 0
    _, variables = export.load_npz(str(out))
    want = helpers.student_params(config, single, "kd_sharded")
    helpers.assert_trees_close(variables["params"], jax.tree.map(lambda v: v[1], want))


def test_llm_kinds_under_a_model_axis_across_hosts(tmp_path):
    config = multihost_configs.llm()
    multi, single = tmp_path / "multi", tmp_path / "single"
    for rc, out in _run("llm", multi):
        assert rc == 0, out[-3000:]
    helpers.run(config, single)
    assert_same_run(config, multi, single, ["gkd"])
    for stage in ("topk", "score"):
        shards = sorted(os.path.basename(p) for p in glob.glob(str(single / stage / "*.kdrec")))
        assert shards, os.listdir(single / stage)
        match, mismatch, errors = filecmp.cmpfiles(single / stage, multi / stage, shards, False)
        assert match == shards, (mismatch, errors)


def test_teacher_identity_is_position_sensitive_and_the_same_for_every_layout():
    """teacher.fingerprint: the integrity digest, not sums (a permuted matrix, or two changes
    that cancel, left the old float64-sum fingerprint unchanged)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kd_jax import sharding
    from kd_jax import teacher as teacher_lib

    w = np.arange(64, dtype=np.float32).reshape(8, 8) / 7.0
    base = teacher_lib.fingerprint({"w": w})
    assert teacher_lib.fingerprint({"w": w[::-1].copy()}) != base  # same sum, permuted rows
    cancel = w.copy()
    cancel[0, 0] += 1.0
    cancel[1, 1] -= 1.0  # the same sum again
    assert teacher_lib.fingerprint({"w": cancel}) != base
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1})
    for spec in (P("fsdp"), P(None, "fsdp"), P()):
        placed = jax.device_put(w, NamedSharding(mesh, spec))
        assert teacher_lib.fingerprint({"w": placed}) == base
