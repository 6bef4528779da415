"""ViLT (arXiv:2102.03334): HF weight loading, parity with transformers' ViltModel, shapes,
masking and the registry entry.

The parity fixture (tests/fixtures/vilt_tiny.safetensors + vilt_tiny_reference.npz) was made by
scripts/make_vilt_fixture.py with torch + transformers; see tests/fixtures/README.md.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kd_jax import models
from kd_jax.errors import UserFileNotFoundError
from kd_jax.models import vilt_loading
from kd_jax.models.registry import load_pretrained
from kd_jax.models.vilt import ViltConfig, ViltModel, pixels_from_image, vilt_config
from tests.tolerances import f32_tol

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
WEIGHTS = os.path.join(FIXTURES, "vilt_tiny.safetensors")
REFERENCE = os.path.join(FIXTURES, "vilt_tiny_reference.npz")
TINY = ViltConfig(
    vocab_size=100,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    image_size=64,
    patch_size=16,
)


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    """The fixture as `save_pretrained` wrote it: config.json + model.safetensors."""
    d = tmp_path_factory.mktemp("vilt_tiny")
    shutil.copy(WEIGHTS, d / "model.safetensors")
    (d / "config.json").write_text(str(ref["config_json"]))
    return d


def _inputs(ref):
    return (
        ref["input_ids"],
        ref["attention_mask"],
        ref["pixel_values"].transpose(0, 2, 3, 1),  # HF NCHW -> NHWC
        ref["pixel_mask"],
        ref["token_type_ids"],
    )


def _hf_order(ref, text_len: int, grid_w: int) -> np.ndarray:
    """[B, T + 1 + N] indices into our token order for each of HF's tokens: text as is, the
    image [class] token, then each sampled patch at (row, col) -> 1 + row * grid_w + col."""
    b = ref["patch_index"].shape[0]
    rows, cols = ref["patch_index"][..., 0], ref["patch_index"][..., 1]
    image = text_len + 1 + rows * grid_w + cols
    head = np.broadcast_to(np.arange(text_len + 1), (b, text_len + 1))
    return np.concatenate([head, image], axis=1)


def test_parity_with_transformers(ref, hf_dir):
    config, variables = vilt_loading.load_vilt(str(hf_dir))
    assert config == TINY
    pooled, feats = jax.jit(ViltModel(config).apply)(variables, *_inputs(ref))
    t = ref["input_ids"].shape[1]
    order = _hf_order(ref, t, grid_w=80 // 16)
    ours = np.take_along_axis(np.asarray(feats["last_hidden_state"]), order[..., None], axis=1)
    hf = ref["last_hidden_state"]
    assert ours.shape == hf.shape
    # The token masks agree once reordered (HF pads with masked patches).
    mask = np.take_along_axis(np.asarray(feats["mask"]), order, axis=1)
    np.testing.assert_array_equal(mask[:, t:], ref["image_mask"])
    # Longest accumulation: the MLP's 64-term dot products, stacked over 2 layers; values ~|4|.
    tol = f32_tol(64 * 2 * 2, scale=4.0)
    np.testing.assert_allclose(ours, hf, atol=tol, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref["pooler_output"], atol=tol, rtol=0)


def test_loads_vilt_for_head_checkpoints_and_as_pretrained(ref, hf_dir, tmp_path):
    # A ViltFor* checkpoint (e.g. dandelin/vilt-b32-mlm) nests the encoder under "vilt." and
    # carries task heads, which are dropped.
    state = {f"vilt.{k}": v for k, v in load_file(WEIGHTS).items()}
    state["mlm_score.decoder.bias"] = np.zeros(100, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    _, direct = vilt_loading.load_vilt(str(hf_dir))
    jax.tree.map(np.testing.assert_array_equal, load_pretrained(f"hf_vilt:{tmp_path}"), direct)
    # The checkpoint's config.json also fills the architecture of the registry entry.
    assert vilt_config(f"hf_vilt:{hf_dir}") == TINY


def test_loader_errors_name_the_problem(ref, hf_dir, tmp_path):
    with pytest.raises(UserFileNotFoundError, match="config.json"):
        shutil.copy(WEIGHTS, tmp_path / "model.safetensors")
        vilt_loading.load_vilt(str(tmp_path))
    state = load_file(WEIGHTS)
    del state["encoder.layer.1.output.dense.weight"]
    state["encoder.layer.0.crossattention.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"crossattention.*missing params.*layers/output/kernel"):
        vilt_loading.convert_hf_state(state, TINY)
    wide = ViltConfig(**{**TINY.__dict__, "intermediate_size": 48})
    with pytest.raises(ValueError, match="intermediate"):
        vilt_loading.convert_hf_state(load_file(WEIGHTS), wide)
    deeper = ViltConfig(**{**TINY.__dict__, "num_layers": 3})
    with pytest.raises(ValueError, match=r"layer 2"):
        vilt_loading.convert_hf_state(load_file(WEIGHTS), deeper)


def _random_batch(b=2, t=6, h=64, w=48):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 4:] = 0
    pixels = rng.standard_normal((b, h, w, 3)).astype(np.float32)
    pmask = np.ones((b, h, w), np.int32)
    pmask[1, 32:] = 0  # image 1: only the top half is real
    return ids, mask, pixels, pmask


@pytest.fixture(scope="module")
def tiny():
    model = ViltModel(TINY)
    ids, mask, pixels, pmask = _random_batch()
    return model, jax.jit(model.init)(jax.random.key(0), ids, mask, pixels, pmask)


def test_shapes_and_features(tiny):
    model, variables = tiny
    ids, mask, pixels, pmask = _random_batch()
    pooled, f = jax.jit(model.apply)(variables, ids, mask, pixels, pmask)
    n = 1 + (64 // 16) * (48 // 16)
    assert pooled.shape == (2, 32)
    assert f["last_hidden_state"].shape == (2, 6 + n, 32)
    assert f["text_hidden"].shape == (2, 6, 32) and f["image_hidden"].shape == (2, n, 32)
    assert f["layer_1"]["hidden"].shape == (2, 6 + n, 32)
    np.testing.assert_array_equal(f["text_mask"], mask)
    # Image 1 keeps the top 2 of 4 patch rows (3 columns each) and its [class] token.
    np.testing.assert_array_equal(f["image_mask"][1], [1] + [1] * 6 + [0] * 6)
    # Scanned blocks: one parameter stack with a leading layer axis.
    assert variables["params"]["layers"]["query"]["kernel"].shape == (2, 32, 32)
    # The pooler is tanh(W h_[CLS] + b) on the first text token.
    p = variables["params"]["pooler"]
    want = np.tanh(f["last_hidden_state"][:, 0] @ p["kernel"] + p["bias"])
    np.testing.assert_allclose(pooled, want, atol=f32_tol(32, 4.0))


def test_masked_patches_and_tokens_do_not_matter(tiny):
    """Changing padded pixels or padded text ids leaves every real token's state unchanged."""
    model, variables = tiny
    ids, mask, pixels, pmask = _random_batch()
    apply = jax.jit(model.apply)
    pooled, f = apply(variables, ids, mask, pixels, pmask)
    ids2, pixels2 = ids.copy(), pixels.copy()
    ids2[1, 4:] = 7
    pixels2[1, 32:] = 100.0
    pooled2, f2 = apply(variables, ids2, mask, pixels2, pmask)
    keep = np.asarray(f["mask"]).astype(bool)
    np.testing.assert_allclose(pooled2, pooled, atol=f32_tol(64, 4.0))
    a, b = np.asarray(f["last_hidden_state"]), np.asarray(f2["last_hidden_state"])
    np.testing.assert_allclose(b[keep], a[keep], atol=f32_tol(64, 4.0))


def test_patch_sampling_keeps_valid_patches(tiny):
    model, variables = tiny
    ids, mask, pixels, pmask = _random_batch()
    sampled = ViltModel(ViltConfig(**{**TINY.__dict__, "max_image_length": 5}))
    _, f = jax.jit(sampled.apply)(variables, ids, mask, pixels, pmask)
    assert f["image_hidden"].shape == (2, 6, 32)
    assert np.all(np.asarray(f["image_mask"]) == 1)  # both images have >= 5 real patches
    # Training draws a random subset (rng stream "dropout"): two keys, two subsets.
    train = jax.jit(lambda v, k: sampled.apply(v, ids, mask, pixels, pmask, train=True, rngs=k))
    outs = [train(variables, {"dropout": k})[1] for k in jax.random.split(jax.random.key(1), 2)]
    assert not np.allclose(outs[0]["image_hidden"], outs[1]["image_hidden"])


def test_registry_entry_and_preset():
    cfg = ml_collections.ConfigDict(
        {"model": "vilt", "kwargs": {"preset": "vilt-b32", "num_layers": 1}}
    )
    assert models.input_keys(cfg) == ("input_ids", "attention_mask", "pixel_values", "pixel_mask")
    model = models.build(cfg)
    c = model.config
    assert (c.hidden_size, c.num_heads, c.patch_size, c.image_size) == (768, 12, 32, 384)
    assert (c.max_position, c.vocab_size, c.num_layers) == (40, 30522, 1)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 40), jnp.int32),
        jnp.ones((1, 40), jnp.int32),
        jnp.zeros((1, 384, 384, 3)),
        jnp.ones((1, 384, 384), jnp.int32),
    )
    assert shapes["params"]["embeddings"]["position_embeddings"].shape == (1, 145, 768)


def test_bad_inputs_raise():
    model = ViltModel(TINY)
    ids = np.zeros((1, 41), np.int32)
    with pytest.raises(ValueError, match="max_position"):
        model.init(jax.random.key(0), ids, None, np.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.init(jax.random.key(0), ids[:, :4], None, np.zeros((1, 3, 64, 64)))


def test_pixels_from_image_is_the_processor_normalisation():
    # ViltProcessor: rescale 1/255, then (x - 0.5) / 0.5 per channel (mean = std = 0.5).
    img = np.array([[[[0.0, 0.5, 1.0]]]], np.float32)
    np.testing.assert_array_equal(pixels_from_image(img), [[[[-1.0, 0.0, 1.0]]]])


def test_fixture_config_is_what_the_script_wrote(ref):
    hf = json.loads(str(ref["config_json"]))
    assert hf["model_type"] == "vilt" and hf["num_hidden_layers"] == 2
    assert list(ref["versions"])  # torch, transformers versions recorded
