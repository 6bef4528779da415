"""Checkpoint safety: SIGTERM saves and exits 143; a crash mid-save keeps the previous step."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
# kd_jax.checkpoint.integrity of the state in test_integrity_digests_are_pinned, as computed by
# the single whole-state program of commit 1691861 (the per-leaf programs and the NumPy path
# must agree).
PINNED_DIGESTS = {
    "['m']": "bfloat16[2]:855f4e00be000000",
    "['step']": "int32[]:00000005afd46000",
    "['w']": "float32[3, 4]:91107bbdc3cd5fdd",
}


def write_config(path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_sigterm_saves_and_exits_with_its_status(tmp_path):
    cfg = write_config(
        tmp_path / "cfg.py",
        """
        from tests import helpers
        def get_config(arg=None):
            c = helpers.kd_config(teacher_steps=100000)
            c.stage_order = ("teacher",)
            return c
    """,
    )
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd_jax.main", f"--config={cfg}", f"--workdir={workdir}"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "stopped by SIGTERM in stage teacher at step" in out
    assert not (workdir / ".lock").exists()
    ckptr = ckpt_lib.Checkpointer(str(workdir / "teacher" / "checkpoints"), async_save=False)
    step = ckptr.latest_step()
    assert step is not None and 1 <= step < 100000
    ckptr.close()


def test_crash_during_save_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os
        import jax.numpy as jnp
        from kd_jax import checkpoint as ckpt_lib
        c = ckpt_lib.Checkpointer({str(directory)!r}, async_save=True)
        c.save(1, {{"w": jnp.full((4,), 1.0)}}, data_state={{"next_index": 1}}, meta={{}})
        c.wait()
        c.save(2, {{"w": jnp.full((64, 1024, 1024), 2.0)}}, data_state={{"next_index": 2}},
               meta={{}})
        os._exit(1)  # the process dies while the async save of step 2 is in flight.
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    c = ckpt_lib.Checkpointer(str(directory), async_save=False)
    assert c.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    state, data_state, _ = c.restore(target)
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert data_state == {"next_index": 1}
    # Training can carry on and save over the debris of the interrupted step.
    c.save(2, {"w": jnp.zeros(4)}, data_state={"next_index": 2}, meta={}, force=True)
    c.wait()
    assert c.latest_step() == 2
    c.close()


def test_integrity_digests_are_pinned():
    """The per-leaf checksums recorded in checkpoint metadata (and checked on restore) keep their
    values: a change to the digest would make every existing checkpoint look corrupt."""
    state = {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
        "step": jnp.int32(5),
        "m": jnp.ones((2,), jnp.bfloat16),
    }
    digests, finite = ckpt_lib.integrity(state)
    assert finite
    assert digests == PINNED_DIGESTS
    state["w"] = state["w"].at[1, 2].set(jnp.nan)
    digests_nan, finite = ckpt_lib.integrity(state)
    assert not finite and digests_nan["['w']"] != digests["['w']"]


def test_host_and_device_checksums_agree():
    """Arrays in host memory are checksummed by NumPy (nothing to compile), others by the jitted
    per-leaf program; both give the same digest and finiteness for every dtype a state holds,
    across the NumPy path's chunk boundary and for a row-sharded array."""
    rng = np.random.default_rng(0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    leaves = [
        jnp.asarray(rng.standard_normal((5, 7, 3)), jnp.float32),
        jnp.asarray(rng.standard_normal((4, 5)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((4, 5)), jnp.float16),
        jnp.asarray(rng.integers(-9, 9, (33,)), jnp.int32),
        jnp.asarray(rng.integers(0, 255, (33,)), jnp.uint8),
        jnp.array([True, False, True]),
        jnp.array([1.0, jnp.inf, 2.0]),
        jnp.array([1.0, jnp.nan], jnp.bfloat16),  # NumPy alone does not call bf16 inexact.
        jnp.zeros((0, 3)),
        jax.random.key(3),
        jnp.asarray(rng.standard_normal(ckpt_lib._HOST_CHUNK + 17), jnp.float32),
        jax.device_put(jnp.arange(64.0).reshape(16, 4), rows),
    ]
    for x in leaves:
        assert ckpt_lib._in_host_memory(x)
        device = tuple(int(v) for v in multihost.to_host(ckpt_lib._leaf_integrity(x)))
        a, b, finite = ckpt_lib._host_leaf_integrity(x)
        assert (a, b, int(finite)) == device, (x.dtype, x.shape)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(9), jnp.float64)
        device = tuple(int(v) for v in multihost.to_host(ckpt_lib._leaf_integrity(x)))
        assert ckpt_lib._host_leaf_integrity(x)[:2] == device[:2]


def test_cpu_save_of_a_replicated_state_restores_exactly(tmp_path):
    """On the 8 CPU devices one replica writes each replicated leaf (orbax's replica-parallel
    save is turned off there: it compiled a slice program per leaf shape); the restored state is
    the saved one, with the requested sharding."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"a": jnp.arange(8 * 13, dtype=jnp.float32).reshape(8, 13), "b": jnp.ones((24, 5))}
    state = {"a": jax.device_put(state["a"], replicated), "b": jax.device_put(state["b"], rows)}
    c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    c.save(1, state, data_state={"next_index": 0}, meta={})
    c.wait()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, _, _ = c.restore(target)
    c.close()
    for k in state:
        np.testing.assert_array_equal(restored[k], state[k])
        assert restored[k].sharding == state[k].sharding
