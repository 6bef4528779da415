"""kd_jax.hostmem: the glibc malloc tunables the CLI re-executes itself with under
KD_JAX_HOST_MALLOC=tuned, and what they do (freed blocks stay in the process: a loop of large
allocations stops page-faulting)."""

import os
import platform
import subprocess
import sys

import pytest

from kd_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_", "KD_JAX_HOST"))}
    return {**env, "PYTHONPATH": ROOT, **extra}


@pytest.mark.skipif(not GLIBC, reason="glibc Linux only")
def test_tuned_env_when_to_apply():
    opt_in = {"PATH": "/bin", "KD_JAX_HOST_MALLOC": "tuned"}
    env = hostmem.tuned_env(opt_in)
    assert env["GLIBC_TUNABLES"] == hostmem.TUNABLES and env["PATH"] == "/bin"
    # Off by default and with "system"; the user's own tunables win; the marker of a done
    # re-exec stops a second one.
    assert hostmem.tuned_env({"PATH": "/bin"}) is None
    assert hostmem.tuned_env({"KD_JAX_HOST_MALLOC": "system"}) is None
    assert hostmem.tuned_env({**opt_in, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert hostmem.tuned_env(env) is None
    with pytest.raises(ValueError, match="KD_JAX_HOST_MALLOC='fast'.*'system'.*'tuned'"):
        hostmem.tuned_env({"KD_JAX_HOST_MALLOC": "fast"})
    # Children that should run as the user started us get the environment back.
    assert hostmem.started_env(env) == opt_in
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hostmem.started_env(mine) == mine


# Mallocs, writes and frees 64 MiB 20 times (over glibc's largest mmap threshold; by libc, as
# XLA:CPU does, not NumPy, which asks for huge pages itself), after the re-exec, and prints the
# minor page faults of the loop and the tunables it ran with.
PROBE = """
import ctypes, os, resource
from kd_jax import hostmem
hostmem.reexec_tuned()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch(n=64 << 20):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
f0 = faults()
for _ in range(20):
    touch()
print(faults() - f0, os.environ.get("GLIBC_TUNABLES"))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc Linux only")
def test_reexec_keeps_freed_memory_in_process():
    def run(**extra):
        out = subprocess.run(
            [sys.executable, "-c", PROBE], env=clean_env(**extra), capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        n, tunables = out.stdout.split()
        return int(n), tunables

    tuned, tunables = run(KD_JAX_HOST_MALLOC="tuned")
    system, none = run()
    assert tunables == hostmem.TUNABLES and none == "None"
    # 20 x 64 MiB of fresh pages without the tunables: 327,680 faults of 4 KiB pages (640 of
    # 2 MiB ones where transparent huge pages are "always" on); none with them.
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    huge = os.path.exists(thp) and "[always]" in open(thp).read()
    fresh = 20 * (64 << 20) // ((2 << 20) if huge else 4096)
    assert system > fresh // 2, (system, fresh)
    assert tuned < fresh // 10, (tuned, fresh)


def test_cli_reexecs_under_the_switch_and_rejects_a_bad_value(tmp_path):
    """`python -m kd_jax.main` re-executes itself and says so (here on the quick path of a config
    typo); a bad KD_JAX_HOST_MALLOC is a one-line error, not a traceback."""

    def cli(**extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "kd_jax.main",
                f"--workdir={tmp_path}",
                f"--config={ROOT}/configs/classic/mnist_kd.py:tiny",
                "--config.optimizer.learning_rat=1",
            ],
            env=clean_env(JAX_PLATFORMS="cpu", **extra),
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    tuned = cli(KD_JAX_HOST_MALLOC="tuned")
    assert tuned.returncode == 2 and "Did you mean 'learning_rate'" in tuned.stderr
    if GLIBC:
        assert f"host malloc: kd_jax tunables (GLIBC_TUNABLES={hostmem.TUNABLES})" in tuned.stderr
    assert "host malloc" not in cli().stderr
    bad = cli(KD_JAX_HOST_MALLOC="fast")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "KD_JAX_HOST_MALLOC='fast'; use 'system' (the default) or 'tuned'" in bad.stderr
