"""Two local processes (CPU, gloo collectives), 4 devices each, train together; their final
params must equal a single-process run on 8 devices."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import portpicker

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from tests import helpers
def get_config(arg=None):
    return helpers.kd_config(steps=3, teacher_steps=3, **{"mesh.data": 2, "mesh.fsdp": 4})
"""


def test_two_processes_match_single_process(tmp_path):
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(textwrap.dedent(CONFIG))
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kd_jax.main",
                f"--config={cfg_path}",
                f"--workdir={tmp_path / 'multi'}",
                "--distributed",
                "--cpu_devices=4",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    config = helpers.kd_config(steps=3, teacher_steps=3, **{"mesh.data": 2, "mesh.fsdp": 4})
    helpers.run(config, tmp_path / "single")
    for stage in ("teacher", "kd"):
        helpers.assert_trees_close(
            helpers.student_params(config, tmp_path / "multi", stage),
            helpers.student_params(config, tmp_path / "single", stage),
        )
        np.testing.assert_allclose(
            helpers.metrics(tmp_path / "multi", stage),
            helpers.metrics(tmp_path / "single", stage),
            rtol=helpers.RUN_RTOL,  # the same batch reductions, reordered
        )
