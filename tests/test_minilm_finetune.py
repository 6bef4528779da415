"""GLUE fine-tuning configs (configs/minilm/glue.py) on tfds mock data, and the GLUE source."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import config as C
from kd_jax import restore, runner, sharding
from kd_jax.data import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "configs/minilm/glue.py")


def test_glue_source_tokenises_pairs():
    with tfds.testing.mock_data(num_examples=6):
        train_source, eval_source = text.glue_tfds("mnli", max_length=24)
        assert len(eval_source) == 6
        b = train_source.gather(np.arange(3))
    assert b["input_ids"].shape == (3, 24) and b["label"].dtype == np.int32
    # premise in segment 0, hypothesis in segment 1
    assert (b["token_type_ids"] == 1).any(axis=1).all()


def test_missing_glue_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="glue/sst2/2.0.0/"):
        text.glue_tfds("sst2", data_dir=str(tmp_path))


def test_glue_tiny_finetunes_pretrained_encoder(tmp_path, task="sst2"):
    with tfds.testing.mock_data(num_examples=16):
        cfg = C.load(f"{GLUE}:tiny,task={task}")
        res = runner.run(cfg, str(tmp_path))["main"]
        params, _ = restore.restore_student(C.stage_config(cfg, None), _mesh(cfg), str(tmp_path))
    assert res["step"] == 2 and 0.0 <= np.mean(res["eval/accuracy"]) <= 1.0
    # The encoder was warm-started from the bundled teacher, the head was not.
    from kd_jax.models import pretrained

    want = pretrained.load("all-minilm-l6-v2")["word_embeddings"]["embedding"]
    got = np.asarray(params["encoder"]["word_embeddings"]["embedding"][0])
    # two small AdamW steps at lr <= 3e-5 move weights by < 1e-3
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert params["head"]["kernel"].shape[-1] == 2


def test_glue_config_variants():
    mnli = C.load(f"{GLUE}:tiny,task=mnli,init=none,layers=1,hidden=32,heads=2")
    assert mnli.student.kwargs.num_classes == 3 and mnli.student.init == ""
    assert mnli.student.kwargs.num_layers == 1 and mnli.data.kwargs.task == "mnli"
    full = C.load(GLUE)
    assert full.student.init == "pretrained:all-minilm-l6-v2" and full.steps == 3 * 67_349 // 32
    with pytest.raises(ValueError, match="Unknown task"):
        C.load(f"{GLUE}:task=qnli")


def _mesh(cfg):

    return sharding.make_mesh(cfg.mesh, None)
