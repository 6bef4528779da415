"""Test set-up: 8 fake CPU devices (before JAX initialises its backend) and small helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "")
# Tests run few steps of small programs, so XLA's compile time dominates the suite: the backend's
# optimisation level 1 compiles faster than the default (a DeepLabV3 step 5.8 -> 5.2 CPU-s; a
# MonoTAKD tiny run 35.5 -> 30.4). Level 0 is faster still but gave a NaN gradient in the MonoTAKD
# tiny run's IMD term. Subprocesses (CLI runs, notebook kernels) inherit it; set your own level in
# XLA_FLAGS to override.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
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


# Where the suite's time goes: with KD_JAX_COMPILE_REPORT=<file>, each test appends one JSON line
# {test, compiles, compile_s, cache_hits, seconds}: the programs built in this process (XLA
# compiles plus persistent-cache loads, `cache_hits` of them loads), setup and teardown included;
# CLI subprocesses and notebook kernels are not counted.
# `python scripts/compile_report.py <file>` sums them up.
_COMPILE_REPORT = os.environ.get("KD_JAX_COMPILE_REPORT")
_COMPILES = {"compiles": 0, "compile_s": 0.0, "cache_hits": 0}


def _on_duration(event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["compiles"] += 1
        _COMPILES["compile_s"] += duration


def _on_event(event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
        _COMPILES["cache_hits"] += 1


if _COMPILE_REPORT:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _COMPILE_REPORT:
        yield
        return
    import json
    import time

    before, t0 = dict(_COMPILES), time.perf_counter()
    yield
    row = {k: _COMPILES[k] - before[k] for k in _COMPILES}
    row.update(test=item.nodeid, seconds=round(time.perf_counter() - t0, 2))
    row["compile_s"] = round(row["compile_s"], 2)
    with open(_COMPILE_REPORT, "a") as f:
        f.write(json.dumps(row) + "\n")
