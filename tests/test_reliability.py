"""Nothing lost, nothing silent (round 2): every reader verifies a checkpoint's checksums; export
writes atomically, refuses to overwrite and reads only finished stages by default; SIGINT and
SIGTERM stop a run cleanly at any point and it resumes bit-identically with one metrics row per
step."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket

import jax
import pytest

from kd_jax import checkpoint as ckpt_lib
from kd_jax import config as C
from kd_jax import evaluators, export, restore, runner, sharding
from kd_jax import teacher as teacher_lib
from kd_jax.errors import CheckpointError, Preempted, UnfinishedStageError
from kd_jax.export import cli as export_cli
from kd_jax.export import npz as npz_lib
from kd_jax.trainers import kd as kd_lib
from tests import helpers

QUIET = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """teacher (2 steps) -> kd (2 steps), finished."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    config = helpers.kd_config(steps=2, teacher_steps=2)
    helpers.run(config, workdir)
    return config, workdir


def _copy(trained, dest):
    config, workdir = trained
    shutil.copytree(workdir, dest)
    return config, dest


def _flip(stage_dir) -> None:
    """Flips 8 bytes in the middle of the largest array file of the newest checkpoint."""
    ckptr = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
    step = ckptr.latest_step()
    ckptr.close()
    pattern = os.path.join(str(stage_dir), "checkpoints", str(step), "state", "**", "d", "*")
    path = max(glob.glob(pattern, recursive=True), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0x5A for b in data[mid : mid + 8])
    open(path, "wb").write(bytes(data))


@QUIET
def test_a_flipped_checkpoint_is_refused_by_every_reader(trained, tmp_path, capsys):
    config, w = _copy(trained, tmp_path / "w")
    _flip(w / "teacher")
    mesh = sharding.make_mesh(config.mesh)
    teacher_cfg = C.stage_config(config, "teacher")
    # Export: exit 2, one message, nothing written.
    out = tmp_path / "out"
    argv = ["--workdir", str(w), "--stage", "teacher", "--format", "npz", "--out", str(out)]
    assert export_cli.main(argv) == 2
    assert "fail their checksum" in capsys.readouterr().err and not out.exists()
    # Notebooks and evaluation scripts.
    with pytest.raises(CheckpointError, match="checksum|unreadable"):
        restore.restore_state(teacher_cfg, mesh, str(w / "teacher"))
    with pytest.raises(CheckpointError):
        restore.restore_student_variables(teacher_cfg, mesh, str(w / "teacher"))
    # A `stage:` teacher is never distilled from corrupt weights.
    stages = runner.resolve(config, str(w))
    kd_cfg = stages["kd"]
    stage = kd_lib.build_stage(kd_cfg, mesh)
    example = stage.data.abstract_inputs(stage.teacher_inputs)
    with pytest.raises(CheckpointError, match=str(w / "teacher")):
        teacher_lib.load(kd_cfg, mesh, example, stages, str(w))
    # Training resume of a damaged stage (another copy, its teacher intact).
    _, w2 = _copy(trained, tmp_path / "w2")
    _flip(w2 / "kd")
    with pytest.raises(CheckpointError, match=str(w2 / "kd")):
        helpers.run(helpers.kd_config(steps=3, teacher_steps=2), w2)


def test_restore_compares_every_stored_path(tmp_path):
    """A checksum record that lacks an array, or has one the state lacks, is itself corrupt."""
    c = ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False)
    state = {"w": jax.numpy.arange(4.0), "b": jax.numpy.ones(2)}
    c.save(1, state, data_state={}, meta={})
    c.wait()
    path = tmp_path / "c" / "1" / "integrity" / "metadata"
    record = json.loads(path.read_text())
    record["arrays"]["['extra']"] = record["arrays"]["['w']"]
    path.write_text(json.dumps(record))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(CheckpointError, match="not read"):
        c.restore(abstract, step=1)
    c.close()


def test_export_refuses_to_overwrite_and_replaces_on_request(trained, tmp_path, capsys):
    _, w = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--workdir", str(w), "--stage", "kd", "--format", "npz", "--out", str(out)]
    assert export_cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_cli.main([*argv, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["architecture.json", "variables.npz"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert export_cli.main([*argv[:-1], str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left


def test_a_full_disk_leaves_nothing_half_written(trained, tmp_path, capsys, monkeypatch):
    _, w = trained
    out = tmp_path / "out"

    def full(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz_lib.np, "savez", full)
    argv = ["--workdir", str(w), "--stage", "kd", "--format", "npz", "--out", str(out)]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "nothing was written" in err and "Traceback" not in err
    assert not out.exists() and not os.listdir(tmp_path)


_FIRED: list[int] = []


@evaluators.register("interrupt_once")
def _interrupt_once(ctx):
    """Sends this process SIGINT (the user's Ctrl-C) at its first evaluation in the process."""

    def evaluate(student_vars, teacher_vars):
        if not _FIRED:
            _FIRED.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    return evaluate


def _interrupted_config():
    c = helpers.kd_config(steps=4, teacher_steps=1)
    c.stages.kd.evals = {"stop": {"evaluator": "interrupt_once", "every": 2}}
    return c


def test_sigint_stops_cleanly_and_the_rerun_resumes_bit_identically(tmp_path):
    work, before = tmp_path / "w", signal.getsignal(signal.SIGINT)
    _FIRED.clear()
    first = helpers.run(_interrupted_config(), work)
    assert first["kd"] == {"stage": "kd", "preempted": True, "step": 2}
    assert not (work / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is before
    # Export of the stopped stage: only with a step (or --allow_unfinished).
    with pytest.raises(UnfinishedStageError, match="step 2 of 4"):
        export.load_student(str(work), "kd")
    assert export.load_student(str(work), "kd", step=2).step == 2
    assert export.load_student(str(work), "kd", allow_unfinished=True).step == 2
    second = helpers.run(_interrupted_config(), work)  # resumes at step 2; no second signal
    assert second["kd"]["step"] == 4
    plain = helpers.kd_config(steps=4, teacher_steps=1)
    helpers.run(plain, tmp_path / "plain")
    helpers.assert_trees_equal(
        helpers.student_params(plain, work, "kd"),
        helpers.student_params(plain, tmp_path / "plain", "kd"),
    )


def test_rows_past_the_last_checkpoint_are_cut_on_resume(tmp_path):
    """A run killed after step 4 whose last checkpoint is step 2: the rerun writes steps 3 and 4
    again, and metrics.jsonl keeps one row per step, the rerun's."""
    c = helpers.kd_config(steps=4, teacher_steps=1, checkpoint_every=2, keep_checkpoints=3)
    work = tmp_path / "w"
    helpers.run(c, work)
    reference = [json.loads(r) for r in open(work / "metrics.jsonl")]
    shutil.rmtree(work / "kd" / "checkpoints" / "4")
    os.remove(work / "kd" / "result.json")
    helpers.run(c, work)
    rows = [json.loads(r) for r in open(work / "metrics.jsonl")]
    keys = [(r["stage"], r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)) == len(reference)
    by_key = {(r["stage"], r["step"], tuple(sorted(r))): r for r in reference}
    for r in rows:
        want = by_key[(r["stage"], r["step"], tuple(sorted(r)))]
        assert {k: v for k, v in r.items() if k != "examples_per_sec"} == {
            k: v for k, v in want.items() if k != "examples_per_sec"
        }


def test_a_locked_workdir_exports_only_a_named_step(trained, tmp_path):
    _, w = _copy(trained, tmp_path / "w")
    lock = w / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    in_flight = w / "kd" / "checkpoints" / "3.orbax-checkpoint-tmp-1"  # the live run's save
    in_flight.mkdir()
    with pytest.raises(UnfinishedStageError, match="running run"):
        export.load_student(str(w), "kd")
    assert export.load_student(str(w), "kd", step=2).step == 2
    assert in_flight.exists()  # a reader never cleans up or rotates another run's checkpoints


def test_a_stop_during_start_up_trains_nothing_and_keeps_no_partial_cache(tmp_path):
    c = helpers.kd_config(steps=2, teacher_steps=1)
    stop = runner.Stop()
    stop.request(signal.SIGTERM)
    res = runner.run(c, str(tmp_path / "w"), stop=stop)
    assert res == {"teacher": {"stage": "teacher", "preempted": True, "step": 0}}
    assert not (tmp_path / "w" / ".lock").exists()
    # The teacher cache: an unfinished one is discarded, nothing written.
    helpers.run(c, tmp_path / "t")
    stages = runner.resolve(c, str(tmp_path / "t"))
    cfg = stages["kd"]
    cfg.teacher.placement = "cache"
    stage = kd_lib.build_stage(cfg, sharding.make_mesh(cfg.mesh))
    example = stage.data.abstract_inputs(stage.teacher_inputs)
    t = teacher_lib.load(cfg, stage.mesh, example, stages, str(tmp_path / "t"))
    cache_dir = tmp_path / "cache"
    with pytest.raises(Preempted):
        teacher_lib.build_cache(t, ["logits"], stage.data, cfg, str(cache_dir), stop)
    assert not cache_dir.exists() or not os.listdir(cache_dir)


def test_a_killed_save_leaves_no_temporary_directory_behind(tmp_path):
    c = ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False)
    c.save(1, {"w": jax.numpy.ones(3)}, data_state={}, meta={})
    c.close()
    leftover = tmp_path / "c" / "2.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    c = ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False)
    assert c.all_steps() == [1] and not leftover.exists()
    c.close()
