"""teacher.placement = "submesh" (kd_jax.submesh): the teacher on its own devices.

A sub-mesh run equals a same-mesh run of the same config: the global batch is the same (32), only
the student's shards differ (4 devices against all 8), so the runs differ by the order of the
batch reductions, which tests/helpers.RUN_RTOL covers (the teacher stage before it runs on the
same 8 devices in both runs, so both kd stages read the same teacher)."""

import os
import shutil

import jax
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import sharding, submesh
from kd_jax import teacher as teacher_lib
from kd_jax.errors import ConfigValueError
from kd_jax.trainers import kd
from tests import helpers

SUB = {"stages.kd.teacher.placement": "submesh", "stages.kd.teacher.devices": "last:4"}


def devices_of(tree) -> set:
    return set().union(*(x.sharding.device_set for x in jax.tree.leaves(tree)))


def test_submesh_run_equals_same_mesh_run_and_resumes(tmp_path):
    """num_seeds=2 with a `stage:` teacher (one teacher per seed). The sub-mesh run resumes from
    its step-2 checkpoint, saved when the loop had already taken batch 3 for the teacher: the
    data state it records is the one after batch 2."""
    sub_cfg = helpers.kd_config(num_seeds=2, checkpoint_every=2, **SUB)
    with jax.default_matmul_precision("float32"):
        ref = helpers.run(helpers.kd_config(num_seeds=2), tmp_path / "same")
        helpers.run(sub_cfg, tmp_path / "sub")
        shutil.rmtree(tmp_path / "sub" / "kd" / "checkpoints" / "4")
        os.remove(tmp_path / "sub" / "kd" / "result.json")
        sub = helpers.run(sub_cfg, tmp_path / "sub")
    assert sub["kd"]["teacher"]["placement"] == "submesh"
    assert sub["kd"]["train_step_compiles"] == 1  # the fed features match the lowered step
    for key in ("loss/seeds", "loss/kd/seeds", "loss/ce/seeds", "grad_norm/seeds"):
        got, want = (
            helpers.metrics(tmp_path / "sub", "kd", key),
            helpers.metrics(tmp_path / "same", "kd", key),
        )
        assert len(got) == len(want) == 4, key
        np.testing.assert_allclose(got, want, rtol=helpers.RUN_RTOL, atol=helpers.RUN_ATOL)
    np.testing.assert_allclose(
        sub["kd"]["eval/accuracy"], ref["kd"]["eval/accuracy"], atol=1 / 64 + 1e-9
    )
    cfg = helpers.kd_config(num_seeds=2, **SUB)
    helpers.assert_trees_close(
        helpers.student_params(cfg, tmp_path / "sub", "kd"),
        helpers.student_params(cfg, tmp_path / "same", "kd"),
    )


def test_submesh_arrays_sit_on_their_own_devices(tmp_path):
    """A shared teacher (random init) FSDP-sharded over a 2 x 2 teacher mesh on the last 4
    devices; the student's state, batch and the moved features on the first 4."""
    config = helpers.kd_config(
        num_seeds=2,
        **{
            "stages.kd.teacher.placement": "submesh",
            "stages.kd.teacher.init": "random:0",
            "stages.kd.teacher.mesh.data": 2,
            "stages.kd.teacher.mesh.fsdp": 2,
        },
    )  # teacher.devices "": as many as teacher.mesh's sizes give (4)
    cfg = C.stage_config(config, "kd")
    devs = sorted(jax.devices(), key=lambda d: d.id)
    student_devs, teacher_devs = set(devs[:4]), set(devs[4:])
    stage = kd.build_stage(cfg, sharding.make_mesh(config.mesh))
    assert set(stage.mesh.devices.flat) == student_devs
    assert set(stage.teacher_mesh.devices.flat) == teacher_devs
    assert {s.device_set == student_devs for s in jax.tree.leaves(stage.state_shardings)} == {True}
    example = stage.data.abstract_inputs(stage.teacher_inputs)
    teacher = teacher_lib.load(cfg, stage.teacher_mesh, example, {}, str(tmp_path))
    assert teacher.axis is None and teacher.ident["placement"] == "submesh"
    assert devices_of(teacher.variables) == teacher_devs
    specs = [x.sharding.spec for x in jax.tree.leaves(teacher.variables)]
    assert any("fsdp" in spec for spec in specs)  # FSDP over the teacher's own mesh

    paths = stage.objective.teacher_paths
    feed = submesh.Feed(teacher, paths, stage.mesh, stage.teacher_mesh, stage.data, 2, "vmap")
    local = stage.data.example_batch()
    batch = feed(local)
    assert devices_of(batch) == student_devs
    feats = jax.tree.map(np.asarray, batch["teacher"])
    with jax.default_matmul_precision("float32"):
        host = jax.tree.map(np.asarray, teacher.variables)
        want = teacher_lib.forward(teacher.module, teacher.inputs, paths, host, local)
    for p in paths:
        assert feats[p].shape == (32, 2, *want[p].shape[1:])  # [B, seeds, ...], as a cache's
        for s in range(2):
            np.testing.assert_allclose(feats[p][:, s], want[p], rtol=1e-5, atol=1e-6)
    # The multi-process move (each process copies its own rows) gives device_put's array.
    raw = feed.forward(teacher.variables, sharding.make_global(stage.teacher_mesh, local, 32))
    for p in paths:
        dst = feed.shardings[p]
        moved = submesh.move(raw[p], dst, piecewise=True)
        assert moved.sharding == dst and moved.sharding.device_set == student_devs
        np.testing.assert_array_equal(np.asarray(moved), feats[p])


@pytest.mark.parametrize(
    "over, match",
    [
        ({"teacher.devices": "last:8"}, "1 to 7"),
        ({"teacher.devices": 0}, "1 to 7"),
        ({"teacher.devices": "middle:3"}, "per_process:N"),
        ({"teacher.devices": ""}, "needs the teacher's devices"),
        ({"teacher.devices": "per_process:8"}, "1 to 7 of each process"),
        ({"teacher.devices": "last:4", "teacher.mesh.data": 3}, "teacher's config.teacher.mesh"),
        ({"teacher.devices": "last:4", "mesh.data": 3}, "student's config.mesh"),
        ({"teacher.devices": "last:3"}, "teacher's mesh"),  # 32 rows over 3 teacher shards
    ],
)
def test_submesh_bad_splits_are_user_errors(over, match):
    cfg = C.stage_config(helpers.kd_config(), "kd")
    cfg.teacher.placement = "submesh"
    for key, value in over.items():
        C.apply_override(cfg, key, repr(value))
    with pytest.raises(ConfigValueError, match=match):
        submesh.split(cfg, sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}))


def test_submesh_needs_the_standard_step():
    """Kinds whose step rewrites the batch before the teacher reads it (gkd, mlm)."""
    cfg = C.stage_config(helpers.kd_config(**SUB), "kd")
    kd._check_submesh_kind(cfg, kd.make_train_step)
    with pytest.raises(ConfigValueError, match="rewrites the batch"):
        kd._check_submesh_kind(cfg, lambda stage, t_axis, cached: None)
