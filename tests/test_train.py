"""End-to-end trainer behaviour on a fake 8-device CPU mesh."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from kd_jax import checkpoint as ckpt_lib
from kd_jax import config as config_lib
from kd_jax import sharding
from kd_jax.models import bert
from kd_jax.trainers import kd
from tests import helpers


def test_sharded_equals_single_device(tmp_path):
    single = helpers.kd_config(**{"mesh.data": 1})
    helpers.run(single, tmp_path / "one", devices=jax.devices()[:1])
    sharded = helpers.kd_config(**{"mesh.data": 2, "mesh.fsdp": 4})
    res = helpers.run(sharded, tmp_path / "eight")
    for stage in ("teacher", "kd"):
        np.testing.assert_allclose(
            helpers.metrics(tmp_path / "eight", stage),
            helpers.metrics(tmp_path / "one", stage),
            rtol=helpers.RUN_RTOL,  # the same batch reductions, reordered
        )
        helpers.assert_trees_close(
            helpers.student_params(sharded, tmp_path / "eight", stage),
            helpers.student_params(single, tmp_path / "one", stage, devices=jax.devices()[:1]),
        )
    # FSDP rules really sharded the student's kernels over the fsdp axis.
    stage = kd.build_stage(
        config_lib.stage_config(sharded, "kd"),
        sharding.make_mesh(sharded.mesh),
    )
    spec = stage.state_shardings.params["student"]["dense0"]["kernel"].spec
    assert "fsdp" in tuple(spec)
    # One compile for the whole run: the step never retraces.
    assert res["kd"]["train_step_compiles"] == 1


def test_learning_happens_and_kd_tracks_teacher(tmp_path):
    cfg = helpers.kd_config(steps=40, teacher_steps=40, **{"log_every": 10})
    res = helpers.run(cfg, tmp_path)
    assert res["teacher"]["eval/accuracy"][0] > 0.9
    assert res["kd"]["eval/accuracy"][0] > 0.9
    assert res["kd"]["eval/teacher_agreement"][0] > 0.9
    losses = helpers.metrics(tmp_path, "kd")
    assert losses[-1] < 0.5 * losses[0]


def test_exact_resume_is_bit_identical(tmp_path):
    cfg = helpers.kd_config(steps=6, **{"checkpoint_every": 3, "keep_checkpoints": 5})
    helpers.run(cfg, tmp_path / "full")
    # A run that stopped at step 3 of the kd stage: keep only that checkpoint, then resume.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "teacher", part / "teacher")
    os.makedirs(part / "kd" / "checkpoints")
    shutil.copytree(
        tmp_path / "full" / "kd" / "checkpoints" / "3", part / "kd" / "checkpoints" / "3"
    )
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["stage"] == "teacher"]
    with open(part / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    helpers.run(cfg, part)
    helpers.assert_trees_equal(
        helpers.student_params(cfg, tmp_path / "full", "kd"),
        helpers.student_params(cfg, part, "kd"),
    )
    full_losses = helpers.metrics(tmp_path / "full", "kd")
    assert helpers.metrics(part, "kd") == full_losses[3:]


def test_checkpoint_excludes_teacher_and_records_identity(tmp_path):
    cfg = helpers.kd_config(steps=2, teacher_steps=2)
    res = helpers.run(cfg, tmp_path)
    ident = res["kd"]["teacher"]
    assert ident["init"] == "stage:teacher" and ident["source_step"] == 2
    assert len(ident["fingerprint"]) == 16
    ckptr = ckpt_lib.Checkpointer(str(tmp_path / "kd" / "checkpoints"), async_save=False)
    assert ckptr.read_meta()["teacher"]["fingerprint"] == ident["fingerprint"]
    ckptr.close()
    stage = kd.build_stage(config_lib.stage_config(cfg, "kd"), sharding.make_mesh(cfg.mesh))
    assert set(stage.abstract_state.params) == {"student", "aux"}
    n_student = sum(x.size for x in jax.tree.leaves(stage.abstract_state.params))
    n_opt_and_params = sum(x.size for x in jax.tree.leaves(stage.abstract_state))
    # adamw keeps two moments per student parameter; nothing of the teacher's 32-wide MLP.
    assert n_opt_and_params < 3 * n_student + 16


def test_seed_replicas_match_single_seed_runs(tmp_path):
    both = helpers.kd_config(num_seeds=2, steps=3, teacher_steps=3)
    helpers.run(both, tmp_path / "both")
    unrolled = helpers.kd_config(
        num_seeds=2, steps=3, teacher_steps=3, **{"seeds_in_step": "unroll"}
    )
    helpers.run(unrolled, tmp_path / "unrolled")
    one = helpers.kd_config(steps=3, teacher_steps=3, seed=1)
    helpers.run(one, tmp_path / "one")
    p_both = helpers.student_params(both, tmp_path / "both", "kd")
    p_unrolled = helpers.student_params(unrolled, tmp_path / "unrolled", "kd")
    p_one = helpers.student_params(one, tmp_path / "one", "kd")
    helpers.assert_trees_close(jax.tree.map(lambda x: x[1:], p_both), p_one)
    helpers.assert_trees_close(p_both, p_unrolled)
    assert not np.allclose(p_both["head"]["kernel"][0], p_both["head"]["kernel"][1])


@pytest.mark.parametrize("placement", ["sharded", "cache"])
def test_teacher_placements_agree(tmp_path, placement):
    base = helpers.kd_config(steps=3, teacher_steps=2, **{"mesh.data": 2, "mesh.fsdp": 4})
    helpers.run(base, tmp_path / "replicated")
    other = helpers.kd_config(
        steps=3,
        teacher_steps=2,
        **{"mesh.data": 2, "mesh.fsdp": 4, "stages.kd.teacher.placement": placement},
    )
    helpers.run(other, tmp_path / placement)
    helpers.assert_trees_close(
        helpers.student_params(other, tmp_path / placement, "kd"),
        helpers.student_params(base, tmp_path / "replicated", "kd"),
    )
    if placement == "cache":
        assert any(n.startswith("teacher_cache_") for n in os.listdir(tmp_path / "cache" / "kd"))


def test_nonfinite_loss_names_step_and_checkpoint(tmp_path):
    cfg = helpers.kd_config(
        steps=8, teacher_steps=8, **{"data.kwargs.corrupt_index": 5, "checkpoint_every": 1}
    )
    with pytest.raises(kd.NonFiniteLossError, match=r"at step \d+.*Last good checkpoint: step \d"):
        helpers.run(cfg, tmp_path / "stop")
    skip = helpers.kd_config(
        steps=8, teacher_steps=8, **{"data.kwargs.corrupt_index": 5, "skip_nonfinite": True}
    )
    res = helpers.run(skip, tmp_path / "skip")
    assert np.isfinite(res["kd"]["eval/loss"]).all()
    finite = helpers.metrics(tmp_path / "skip", "teacher", "finite")
    assert 0.0 in finite and finite[-1] == 1.0


def test_batch_not_divisible_by_mesh_is_clear(tmp_path):
    cfg = helpers.kd_config(**{"data.batch_size": 36})
    with pytest.raises(ValueError, match="data.batch_size=36 must be divisible by the 8"):
        helpers.run(cfg, tmp_path)


def test_mixed_precision_keeps_float32_params(tmp_path):
    cfg = helpers.kd_config(steps=3, teacher_steps=3, **{"compute_dtype": "bfloat16"})
    res = helpers.run(cfg, tmp_path)
    params = helpers.student_params(cfg, tmp_path, "kd")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert np.isfinite(res["kd"]["eval/loss"]).all()
    # Activations really are bfloat16.
    stage = kd.build_stage(config_lib.stage_config(cfg, "kd"), sharding.make_mesh(cfg.mesh))
    x = np.zeros((2, 8, 8, 1), np.float32)
    logits, _ = stage.student.apply({"params": jax.tree.map(lambda p: p[0], params)}, x)
    assert logits.dtype == jax.numpy.bfloat16


def test_tensor_parallel_rules_shard_over_model_axis_and_match_data_parallel(tmp_path):
    rules = (
        ("student/dense0/kernel", "model:-1"),
        ("student/head/kernel", "model:0"),
        (".*", "replicate"),
    )
    base = helpers.kd_config(**{"mesh.data": 8})
    helpers.run(base, tmp_path / "dp")
    tp = helpers.kd_config(**{"mesh.data": 4, "mesh.model": 2})
    with tp.unlocked():
        tp.sharding_rules = rules
    helpers.run(tp, tmp_path / "tp")
    np.testing.assert_allclose(
        helpers.metrics(tmp_path / "tp", "kd"), helpers.metrics(tmp_path / "dp", "kd"), rtol=1e-5
    )
    stage = kd.build_stage(config_lib.stage_config(tp, "kd"), sharding.make_mesh(tp.mesh))
    student = stage.state_shardings.params["student"]
    assert tuple(student["dense0"]["kernel"].spec) == (None, None, "model")  # seed, in, out
    assert tuple(student["head"]["kernel"].spec) == (None, "model", None)
    # BERT declares Megatron-style rules for its attention and MLP kernels.

    enc = bert.BertEncoder(
        bert.BertConfig(
            vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
        )
    )
    ids = jax.ShapeDtypeStruct((2, 8), np.int32)
    shapes = jax.eval_shape(enc.init, jax.random.key(0), ids, ids, ids)["params"]
    sh = sharding.tree_shardings(
        {"student": shapes}, sharding.make_mesh(tp.mesh), bert.TENSOR_PARALLEL_RULES
    )["student"]["layer_0"]
    assert tuple(sh["attention"]["query"]["kernel"].spec) == (None, "model")
    assert tuple(sh["attention"]["output"]["kernel"].spec) == ("model", None)
    assert tuple(sh["intermediate"]["kernel"].spec) == (None, "model")
    assert tuple(sh["output"]["kernel"].spec) == ("model", None)
    with pytest.raises(ValueError, match="Unknown sharding action 'tp'"):
        sharding.tree_shardings(shapes, sharding.make_mesh(tp.mesh), ((".*", "tp"),))
