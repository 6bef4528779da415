"""Config loading, locking, overrides, and a one-step run of every config file's `tiny` variant."""

import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import restore, runner
from kd_jax.errors import ConfigValueError
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config files define get_config; a data module beside them (configs/cifar100/settings.py) not.
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if "def get_config" in open(p).read()
)
MNIST_KD = os.path.join(ROOT, "configs", "classic", "mnist_kd.py")


def test_override_unknown_key_suggests_closest():
    with pytest.raises(KeyError, match=r"'optimizer.learning_rat'.*Did you mean 'learning_rate'"):
        C.load(MNIST_KD + ":tiny", ["optimizer.learning_rat=1e-3"])
    with pytest.raises(KeyError, match=r"Did you mean 'num_seeds'"):
        C.load(MNIST_KD + ":tiny", ["num_seed=2"])


def test_config_file_typo_is_an_error():
    c = C.base_config()
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        c.optimizer.learnig_rate = 1.0  # the base schema is locked at construction time.
    c = C.base_config()
    with c.unlocked():
        c.stages.kd = {"stepz": 3}
    with pytest.raises(KeyError, match=r"stages.kd.stepz'. Did you mean 'steps'"):
        C.validate(c)
    c = C.base_config()
    c.objective = {"kd": C.term("hinton_kd")}
    with c.objective.kd.unlocked():
        c.objective.kd.wieght = 2.0
    with pytest.raises(KeyError, match=r"objective.kd.wieght'. Did you mean 'weight'"):
        C.validate(c)


def test_overrides_are_typed_and_locked():
    c = C.load(
        MNIST_KD + ":tiny",
        ["optimizer.learning_rate=1", "stages.kd.steps=7", "data.kwargs.limit=300"],
    )
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.stages.kd.steps == 7 and c.data.kwargs.limit == 300
    with pytest.raises(AttributeError):
        c.new_field = 1


def test_stage_config_merges_over_defaults():
    c = C.load(MNIST_KD + ":tiny")
    kd = C.stage_config(c, "kd")
    assert kd.stage_name == "kd" and kd.teacher.init == "stage:teacher"
    assert set(kd.objective) == {"kd", "ce"}
    assert kd.optimizer.learning_rate == c.optimizer.learning_rate


def _variants(path: str) -> list[str]:
    """A config file may list the arguments CI runs (`TEST_VARIANTS`); the default is "tiny"."""
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [f"{path}:{v}" for v in getattr(module, "TEST_VARIANTS", ("tiny",))]


VARIANTS = [v for p in CONFIGS for v in _variants(p)]
# Full-size variants are only loaded (their data/teachers are the user's), never run.
FULL = [p for p in CONFIGS] + [
    os.path.join(ROOT, "configs/minilm/minilm_v1.py") + ":paper=1",
    os.path.join(ROOT, "configs/minilm/minilm_v2.py") + ":paper=1,large=1",
    os.path.join(ROOT, "configs/transkd/transkd.py") + ":data=acdc,arch=pvtv2",
    os.path.join(ROOT, "configs/transkd/transkd.py") + ":data=shapes",
    os.path.join(ROOT, "configs/lad/lad.py") + ":data=shapes,codes=random",
    os.path.join(ROOT, "configs/lad/lad.py") + ":data=voc,train_codes=fixed,method=lad",
    os.path.join(ROOT, "configs/lad/lad.py") + ":data=shapes,student_init=baseline",
]


@pytest.mark.parametrize("spec", FULL, ids=lambda p: os.path.relpath(p, ROOT))
def test_full_size_configs_load(spec):
    c = C.load(spec)
    assert all(C.stage_config(c, n).steps >= 1 for n in C.stage_names(c))


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_tiny_runs_one_step(spec, tmp_path):
    c = C.load(spec)
    with c.unlocked():
        for name in c.stages:
            c.stages[name].steps = 1
        c.steps = 1
    # rbg keys: XLA:CPU compiles a threefry hash per parameter initialiser into each stage's
    # init program (~8 s per LAD stage, ~20 s per TransKD one); the run is otherwise the same.
    with jax.default_prng_impl("unsafe_rbg"):
        results = runner.run(c, str(tmp_path))
    # Data-writing stages (kind generate / topk_cache) report no step.
    assert all(r["step"] == 1 for r in results.values() if r.get("kind", "kd") == "kd")


def test_cli_typo_is_a_clear_error_without_traceback(tmp_path):
    proc = helpers.run_cli(
        f"--config={MNIST_KD}:tiny",
        f"--workdir={tmp_path}",
        "--config.optimizer.learning_rat=1e-3",
    )
    assert proc.returncode == 2
    assert "Did you mean 'learning_rate'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("data", ["cityscapes", "acdc"])
def test_transkd_evaluator_ignores_the_datasets_void_label(data):
    c = C.load(os.path.join(ROOT, f"configs/transkd/transkd.py:data={data}"))
    assert c.evaluator_kwargs.ignore_index == c.data.kwargs.ignore_index == 19


def test_cli_compilation_cache_is_filled_then_hit(tmp_path):
    """--compilation_cache: the first run writes its compiled programs, a rerun of the same
    config (a new workdir) finds every one of them (nothing new is written) and ends the same."""
    cache = tmp_path / "xla_cache"
    results = []
    for run in ("a", "b"):
        proc = helpers.run_cli(
            f"--config={MNIST_KD}:tiny",
            f"--workdir={tmp_path / run}",
            f"--compilation_cache={cache}",
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        entries = sorted(p.name for p in cache.iterdir())
        stages = sorted(glob.glob(str(tmp_path / run / "*" / "result.json")))
        res = [json.load(open(f)) for f in stages]
        results.append((entries, [{k: r[k] for k in r if "accuracy" in k} for r in res]))
    (first, acc_a), (second, acc_b) = results
    assert first, "the first run wrote no cache entries"
    assert second == first
    assert acc_a == acc_b and acc_a[0]


def test_prng_impl_setting_runs_the_stage_with_that_prng(tmp_path):
    """prng_impl="rbg": init and dropout keys are RngBitGenerator keys (also in the start-up's
    worker threads), and the run trains; an unknown name is refused before any stage runs."""
    c = helpers.kd_config(steps=2, teacher_steps=2)
    c.prng_impl = "rbg"
    results = helpers.run(c, tmp_path / "rbg")
    assert all(r["step"] == 2 for r in results.values())
    cfg = C.stage_config(c, "kd")
    mesh = runner.sharding.make_mesh(cfg.mesh)
    with jax.default_prng_impl("rbg"):  # a threefry checkpoint would not restore into this
        state = restore.restore_state(cfg, mesh, str(tmp_path / "rbg" / "kd"))
    assert state.rng.shape[-1] == 4  # an rbg key's data, not threefry's 2 words
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    c.prng_impl = "philox"
    with pytest.raises(ConfigValueError, match="prng_impl"):
        helpers.run(c, tmp_path / "bad")
