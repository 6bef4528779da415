"""Test set-up: 8 fake CPU devices (before JAX initialises its backend) and small helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Full float32 matmuls everywhere: GPUs (e.g. an H200) default float32 dots to TF32 (a 10-bit
# mantissa, ~1e-3 relative), which the float32 tolerances of tests/helpers.f32_tol do not cover.
jax.config.update("jax_default_matmul_precision", "highest")
import logging  # noqa: E402

logging.getLogger("absl").setLevel(logging.WARNING)

# Tests build many small, identical programs in fresh jit objects; a persistent compilation
# cache shared by the test processes (workers, notebook kernels, CLI subprocesses) turns most
# of those compiles into cache hits. Every program is stored, as `kd_jax.main` does: the many
# small eager-op and loss programs under 0.2 s add up (monotakd.ipynb with a warm cache: 29 s
# storing everything, 35 s storing only programs that took 0.2 s or more).
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), "kd_jax_test_jax_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

from kd_jax import checkpoint  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cpu_checkpoint_saves():
    """The CLI's process-level opt-in (`kd_jax.main`), for the tests' in-process runs."""
    with checkpoint.cpu_arrays_written_by_one_replica():
        yield
