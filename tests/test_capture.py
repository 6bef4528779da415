import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import capture
from tests.tolerances import f32_tol


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(6)(x))


class Net(nn.Module):
    """A model written with no knowledge of kd_jax: it returns logits only."""

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(4, name="head")(x)


def test_capture_by_path_inside_jit():
    net, x = Net(), jnp.ones((2, 5))
    variables = net.init(jax.random.key(0), x)
    fn = jax.jit(lambda v, x: capture.capture(net, v, x, patterns=[r"block_[02]"]))
    out, feats = fn(variables, x)
    assert sorted(feats) == ["block_0", "block_2"]
    # The captured block_0 output equals running block_0 by hand.
    h0 = Block().apply({"params": variables["params"]["block_0"]}, x)
    # The same Dense layers (5 and 6-term dots) inside and outside the capturing jit.
    np.testing.assert_allclose(feats["block_0"], h0, rtol=f32_tol(6))
    np.testing.assert_allclose(out, net.apply(variables, x), rtol=f32_tol(6))
    assert feats["block_2"].shape == (2, 6)


def test_capture_nested_paths_and_discovery():
    net, x = Net(), jnp.ones((1, 5))
    variables = net.init(jax.random.key(0), x)
    paths = capture.module_paths(net, variables, x)
    assert "block_1/Dense_0" in paths and "head" in paths
    _, feats = capture.capture(net, variables, x, patterns=[r"block_\d/Dense_0"])
    assert sorted(feats) == ["block_0/Dense_0", "block_1/Dense_0", "block_2/Dense_0"]


def test_unmatched_pattern_names_paths():
    net, x = Net(), jnp.ones((1, 5))
    variables = net.init(jax.random.key(0), x)
    with pytest.raises(KeyError, match="block_0/Dense_0"):
        capture.capture(net, variables, x, patterns=["blk_9"])


def test_captured_adapter_gives_logits_and_features():
    net, x = Net(), jnp.ones((3, 5))
    wrapped = capture.Captured(net, [r"block_1"])
    variables = wrapped.init(jax.random.key(1), x)
    logits, feats = wrapped.apply(variables, x)
    assert logits.shape == (3, 4) and set(feats) == {"block_1", "logits"}


def test_captured_model_from_a_config_feeds_an_objective_term(tmp_path):
    from kd_jax import config as C
    from kd_jax import runner
    from tests import helpers

    c = helpers.kd_config(steps=6)
    c.stages.kd.student = C.model(
        "captured", base="mlp", patterns=("dense0",), base_kwargs={"widths": (16,)}
    )
    c.stages.kd.objective.hint = C.term(
        "mse", 1.0, student="dense0", teacher="hidden0", adapter="dense"
    )
    res = runner.run(C.validate(c), str(tmp_path))
    assert res["kd"]["step"] == 6
    hint = helpers.metrics(tmp_path, "kd", "loss/hint")
    assert hint[-1] < hint[0]  # the captured intermediate is trained towards the teacher's
    c.stages.kd.student.kwargs.patterns = ("dense9",)
    with pytest.raises(KeyError, match=r"\['dense9'\] matched no submodule of MLP"):
        runner.run(C.validate(c), str(tmp_path / "typo"))


def test_captured_teacher_loads_the_stage_that_trained_its_base(tmp_path):
    from kd_jax import config as C
    from kd_jax import runner
    from tests import helpers

    c = helpers.kd_config(steps=2)
    teacher = C.model("captured", base="mlp", patterns=("dense0",), base_kwargs={"widths": (32,)})
    teacher.init = "stage:teacher"  # trained as a plain "mlp": the wrapper adds no params
    c.stages.kd.teacher = teacher
    c.stages.kd.objective.hint = C.term(
        "mse", 1.0, student="hidden0", teacher="dense0", adapter="dense"
    )
    res = runner.run(C.validate(c), str(tmp_path))
    assert res["kd"]["step"] == 2 and res["kd"]["teacher"]["source_step"] == 4
    assert np.all(np.isfinite(helpers.metrics(tmp_path, "kd", "loss/hint")))
