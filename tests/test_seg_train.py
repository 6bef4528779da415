"""Segmentation in the trainer: BatchNorm state, TransKD adapters in the objective, the LAD
teacher model, augmented input pipelines and the segmentation evaluator."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import data as data_lib
from kd_jax import losses, restore, runner, sharding
from kd_jax.models import lad
from kd_jax.objective import Objective
from kd_jax.trainers import kd
from tests.tolerances import f32_tol

B = 8
NET = {"stem_widths": (4, 4, 8), "widths": (8, 8, 8, 8), "aspp_features": 8, "aspp_rates": (1, 2)}


def _bn_config():
    """teacher (DeepLabV3, BatchNorm) -> student distilled with CWD, on 32x32 shapes."""
    c = C.base_config()
    c.evaluator = "segmentation"
    c.data.name = "shapes_seg"
    c.data.kwargs = {"num_train": 16, "num_eval": 8, "size": (32, 32), "num_classes": 4}
    c.data.batch_size = c.data.eval_batch_size = B
    c.progress_bar, c.async_checkpointing, c.log_every = False, False, 1
    c.optimizer.learning_rate = 1e-2
    c.stages.teacher = {
        "student": C.model("deeplabv3", num_classes=4, **NET),
        "steps": 2,
        "objective": {"ce": C.term("seg_ce")},
    }
    t = C.model("deeplabv3", num_classes=4, **NET)
    t.init = "stage:teacher"
    c.stages.kd = {
        "student": C.model("deeplabv3", num_classes=4, **NET),
        "teacher": t,
        "steps": 1,
        "objective": {
            "ce": C.term("seg_ce"),
            "cwd": C.term("cwd", 3.0, teacher="logits", adapter="conv1x1"),
        },
    }
    c.stage_order = ("teacher", "kd")
    return C.validate(c)


def test_batchnorm_state_is_trained_checkpointed_and_exported(tmp_path):
    cfg = _bn_config()
    res = runner.run(cfg, str(tmp_path))
    assert 0.0 <= res["teacher"]["eval/miou"][0] <= 1.0 and "eval/pixel_acc" in res["kd"]
    assert res["kd"]["teacher"]["source_step"] == 2
    mesh = sharding.make_mesh(cfg.mesh)
    stage_cfg = C.stage_config(cfg, "teacher")
    exported, step = restore.restore_student_variables(stage_cfg, mesh, str(tmp_path / "teacher"))
    assert step == 2 and set(exported) == {"params", "batch_stats"}
    # Running statistics moved away from their init (mean 0, var 1) during training.
    mean = exported["batch_stats"]["backbone"]["stem_bn1"]["bn"]["mean"]
    assert float(jnp.abs(mean).max()) > 0
    # The kd stage's adapter (params["aux"]) is training-only: not in the exported student.
    kd_vars, _ = restore.restore_student_variables(
        C.stage_config(cfg, "kd"), mesh, str(tmp_path / "kd")
    )
    assert "cwd" not in kd_vars["params"] and set(kd_vars) == {"params", "batch_stats"}
    stage = kd.build_stage(C.stage_config(cfg, "kd"), mesh)
    assert set(stage.abstract_state.params["aux"]) == {"cwd"}
    assert set(stage.abstract_state.model_state["student"]) == {"batch_stats"}


def _feats(seed, dims, hw=16):
    # numpy draws: eager jax.random.normal compiles one program per shape on XLA:CPU.
    rng, out = np.random.default_rng(seed), {}
    for i, d in enumerate(dims):
        h = hw // 2**i
        out[f"stage{i + 1}"] = jnp.asarray(rng.normal(size=(2, h, h, d)), jnp.float32)
        out[f"embed{i + 1}"] = jnp.asarray(rng.normal(size=(2, h * h, d)), jnp.float32)
    return out


def _key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")


# "pea" (TransKD-Base) is the PEA part of both variants below.
@pytest.mark.parametrize("pea_adapter", ["pea_gl", "pea_ea"])
def test_transkd_adapters_in_objective(pea_adapter):
    stages, embeds = "stage1,stage2,stage3,stage4", "embed1,embed2,embed3,embed4"
    obj = Objective(
        {
            "hcl": C.term("hcl", student=stages, teacher=stages, adapter="csf"),
            "pea": C.term("pea", student=embeds, teacher=embeds, adapter=pea_adapter),
        }
    )
    s = _feats(0, (8, 8, 16, 16))
    t = _feats(1, (8, 16, 24, 32))
    batch = {"image": jnp.ones((2, 64, 64, 3)), "label": jnp.zeros((2, 64, 64), jnp.int32)}
    # The adapters' init under one jit: op by op it compiled ~250 small programs on XLA:CPU.
    aux, state = jax.jit(obj.init_aux_variables)(_key(2), s, t, batch)
    assert set(state) == {"hcl"} and "batch_stats" in state["hcl"]  # CSF's BatchNorm.
    csf = aux["hcl"]["params"]["csf"]
    assert csf["sk4"]["conv2"]["kernel"].shape == (3, 3, 64, 32)  # to the teacher's width
    if pea_adapter == "pea_gl":
        assert aux["pea"]["params"]["gl_mixer"]["atten_weight"] == 1.0
    if pea_adapter == "pea_ea":
        assert float(aux["pea"]["params"]["fuse"]["fuse_weight4"]) == pytest.approx(0.5)

    def loss(a, st):
        total, m, new = obj.apply(
            a, st, student_feats=s, teacher_feats=t, batch=batch, step=0, train=True
        )
        return total, (m, new)

    # value_and_grad under the jit: one program (a jitted `loss` under an eager grad compiles
    # its forward and its transpose separately).
    (total, (m, new)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(aux, state)
    # The objective's total is the sum of its two (positive) terms: one rounding.
    np.testing.assert_allclose(total, m["loss/hcl"] + m["loss/pea"], rtol=f32_tol(2))
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g["pea"]))
    before = state["hcl"]["batch_stats"]["csf"]["sk1"]["conv1_bn"]["mean"]
    after = new["hcl"]["batch_stats"]["csf"]["sk1"]["conv1_bn"]["mean"]
    assert not np.allclose(before, after)


def test_dual_path_consistency_objective_matches_lad():
    a = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    b = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    got = losses.get("dual_path_consistency")(student=(a, b), temperature=4.0)
    sg = jax.lax.stop_gradient
    want = losses.cwd(student=a, teacher=sg(b), temperature=4.0) + losses.cwd(
        student=b, teacher=sg(a), temperature=4.0
    )
    # The same CWD math, two call paths: softmaxes over 4 x 4 positions.
    np.testing.assert_allclose(got, want, rtol=f32_tol(4 * 4))
    assert float(losses.get("dual_path_consistency")(student=(a, a))) == pytest.approx(0.0)


def test_label_assisted_teacher_model_reads_label_and_runs_two_paths():
    m = lad.LabelAssistedDeepLab(num_classes=4, scale=1.0, **NET)
    x = jnp.zeros((2, 16, 16, 3))
    y = jnp.asarray(np.random.default_rng(0).integers(0, 4, (2, 16, 16)), jnp.int32)
    # Jitted: op by op, the init compiled ~100 small programs on XLA:CPU.
    v = jax.jit(m.init)(jax.random.key(0), x, y)
    assert v["params"]["net"]["backbone"]["stem_conv1"]["kernel"].shape[2] == 4

    @jax.jit
    def run(v, y, rng):
        (lg, f), _ = m.apply(
            v, x, y, train=True, rngs={"noise": rng, "dropout": rng}, mutable=["batch_stats"]
        )
        ev, _ = m.apply(v, x, y)
        return lg, f["logits_2"], ev

    lg, lg2, ev = run(v, y, jax.random.key(1))
    assert lg.shape == lg2.shape == (2, 2, 2, 4)
    assert not np.allclose(lg, lg2)  # independently noised random codes per pass
    _, _, ev_again = run(v, y, jax.random.key(2))
    np.testing.assert_array_equal(ev, ev_again)  # eval: fixed codes, no rng -> deterministic
    _, _, ev_other = run(v, (y + 1) % 4, jax.random.key(1))
    assert not np.allclose(ev, ev_other)  # the label channel reaches the output


def test_augmented_batches_are_pure_in_seed_and_step_and_host_independent():
    kw = C.ConfigDict(
        {
            "name": "shapes_seg",
            "batch_size": 4,
            "eval_batch_size": 4,
            "kwargs": {
                "num_train": 8,
                "num_eval": 4,
                "size": (16, 16),
                "augment": {"flip": True, "translate": 2},
            },
        }
    )
    full = data_lib.build(kw, seed=3, host_slice=slice(0, 4), eval_host_slice=slice(0, 4))
    again = data_lib.build(kw, seed=3, host_slice=slice(0, 4), eval_host_slice=slice(0, 4))
    halves = [
        data_lib.build(kw, seed=3, host_slice=sl, eval_host_slice=sl)
        for sl in (slice(0, 2), slice(2, 4))
    ]
    for k in (0, 1, 5):
        a, b = full.train[k], again.train[k]
        np.testing.assert_array_equal(a["image"], b["image"])
        joined = np.concatenate([h.train[k]["image"] for h in halves])
        np.testing.assert_array_equal(a["image"], joined)
    # Epoch 2 revisits the same examples with fresh augmentations (2 steps per epoch).
    raw = full.train_source.source.gather(full.train[0]["index"])["image"]
    assert not np.array_equal(full.train[0]["image"], full.train[2]["image"]) or not np.array_equal(
        raw, full.train[0]["image"]
    )


def test_unknown_evaluator_is_clear(tmp_path):
    cfg = _bn_config()
    with cfg.unlocked():
        cfg.evaluator = "segmentaton"
        cfg.stage_order = ("teacher",)
        cfg.stages.teacher.steps = 0
    with pytest.raises(ValueError, match="Unknown evaluator 'segmentaton'"):
        runner.run(cfg, os.path.join(str(tmp_path), "w"))
