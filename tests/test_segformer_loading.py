"""User-supplied ImageNet backbones: MiT (SegFormer encoder) and ResNet-18 v1b (DeepLabV3).

The MiT fixture is a tiny random transformers `SegformerModel` (scripts/make_segformer_fixture.py,
tests/fixtures/README.md); the ResNet state dict is synthetic (no torch reference exists)."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from kd_jax import stage_source
from kd_jax import teacher as teacher_lib
from kd_jax.models import check_shapes, deeplab, pretrained, segformer, segformer_loading
from kd_jax.trainers import kd

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
MIT_FILE = os.path.join(FIX, "segformer_tiny.safetensors")
TINY = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2))


def _mit():
    return segformer.MixTransformer(**TINY, sr_ratios=(8, 4, 2, 1), mlp_ratios=(2, 2, 2, 2))


def _to_nvlabs(hf: dict) -> dict:
    """HF Segformer names -> NVlabs/mmseg mit_b*.pth names (key + value fused into kv)."""
    out = {}
    for orig, v in hf.items():
        k = orig.replace("encoder.", "", 1)
        parts = k.split(".")
        if parts[0] == "patch_embeddings":
            k = f"patch_embed{int(parts[1]) + 1}." + ".".join(parts[2:]).replace(
                "layer_norm", "norm"
            )
        elif parts[0] == "layer_norm":
            k = f"norm{int(parts[1]) + 1}.{parts[2]}"
        elif parts[0] == "block":
            rest = ".".join(parts[3:])
            for a, b in (
                ("layer_norm_1", "norm1"),
                ("layer_norm_2", "norm2"),
                ("attention.self.query", "attn.q"),
                ("attention.self.sr", "attn.sr"),
                ("attention.self.layer_norm", "attn.norm"),
                ("attention.output.dense", "attn.proj"),
                ("mlp.dense1", "mlp.fc1"),
                ("mlp.dense2", "mlp.fc2"),
            ):
                rest = rest.replace(a, b)
            if rest.startswith("attention.self.value"):
                continue
            if rest.startswith("attention.self.key"):
                kind = rest.rsplit(".", 1)[1]
                value = hf[orig.replace("key", "value")]
                rest, v = f"attn.kv.{kind}", np.concatenate([v, value])
            k = f"block{int(parts[1]) + 1}.{parts[2]}.{rest}"
        out["backbone." + k] = v
    return out


def test_mit_hf_parity_with_transformers():
    ref = np.load(os.path.join(FIX, "segformer_tiny_reference.npz"))
    params = segformer_loading.load_mit(MIT_FILE)
    model = _mit()
    x = jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1))
    check_shapes(jax.eval_shape(model.init, jax.random.key(0), x)["params"], params, "MiT")
    stages, _ = model.apply({"params": params}, x)
    for i, s in enumerate(stages):
        want = ref[f"stage{i + 1}"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(s), want, atol=1e-4, rtol=1e-4)
    arch = segformer_loading.mit_arch(MIT_FILE)
    assert arch["dims"] == TINY["dims"] and arch["sr_ratios"] == (8, 4, 2, 1)
    assert arch["variant"] == "tiny"  # same widths/depths/ratios as MIT_CONFIGS["tiny"].


def test_mit_nvlabs_naming_gives_identical_params(tmp_path):
    from safetensors.numpy import load_file

    hf = load_file(MIT_FILE)
    path = str(tmp_path / "mit_nvlabs.npz")
    nv = _to_nvlabs(hf)
    nv["head.weight"] = np.zeros((10, 32), np.float32)  # classifier keys are ignored.
    np.savez(path, **nv)
    a, b = segformer_loading.load_mit(MIT_FILE), segformer_loading.load_mit(path)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_mit_wrong_variant_and_missing_key(tmp_path):
    with pytest.raises(ValueError, match=r"not 'b0'.*dims \(32, 64, 160, 256\)"):
        segformer_loading.load_mit(MIT_FILE, variant="b0")
    assert segformer_loading.load_mit(MIT_FILE, variant="tiny")["norm4"]["scale"].shape == (32,)
    from safetensors.numpy import load_file

    hf = load_file(MIT_FILE)
    key = "encoder.block.2.0.mlp.dense2.weight"
    del hf[key]
    path = str(tmp_path / "broken.safetensors")
    save_file(hf, path)
    with pytest.raises(KeyError, match=rf"broken.safetensors.*'{key}'.*\(24, 48\)"):
        segformer_loading.load_mit(path)


# --- ResNet-18 v1b (LAD / CIRKD naming) ----------------------------------------------------

STEM, WIDTHS = (4, 4, 8), (8, 8, 16, 16)


def _torch_resnet_state_dict(rng) -> dict:
    def conv(o, i, k):
        return rng.standard_normal((o, i, k, k)).astype(np.float32)

    sd = {}

    def bn(key, c):
        for f in ("weight", "bias", "running_mean"):
            sd[f"{key}.{f}"] = rng.standard_normal(c).astype(np.float32)
        sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{key}.num_batches_tracked"] = np.zeros((), np.float32)

    c = 3
    for t, b, w in ((0, "conv1.1", STEM[0]), (3, "conv1.4", STEM[1]), (6, "bn1", STEM[2])):
        sd[f"conv1.{t}.weight"] = conv(w, c, 3)
        bn(b, w)
        c = w
    for li, p in enumerate(WIDTHS):
        for k in range(2):
            key = f"layer{li + 1}.{k}."
            sd[key + "conv1.weight"], sd[key + "conv2.weight"] = conv(p, c, 3), conv(p, p, 3)
            bn(key + "bn1", p)
            bn(key + "bn2", p)
            if c != p or (li == 1 and k == 0):
                sd[key + "downsample.0.weight"] = conv(p, c, 1)
                bn(key + "downsample.1", p)
            c = p
    sd["fc.weight"] = np.zeros((10, c), np.float32)
    return {"backbone." + k: v for k, v in sd.items()}


def test_resnet18_v1b_round_trip_and_graft(tmp_path):
    sd = _torch_resnet_state_dict(np.random.default_rng(0))
    path = str(tmp_path / "resnet18_v1b.safetensors")
    save_file(sd, path)
    got = segformer_loading.load_resnet18_v1b(path)
    model = deeplab.DeepLabV3(num_classes=3, stem_widths=STEM, widths=WIDTHS, aspp_features=8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    want = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), shapes)
    for col in ("params", "batch_stats"):
        check_shapes(want[col]["backbone"], got[col], col)
    p, s = got["params"], got["batch_stats"]
    w = sd["backbone.layer2.0.downsample.0.weight"]  # [O, I, 1, 1] -> [1, 1, I, O]
    np.testing.assert_array_equal(p["layer2_0"]["downsample"]["kernel"][0, 0], w[:, :, 0, 0].T)
    np.testing.assert_array_equal(
        p["stem_conv2"]["kernel"][:, :, 1, 2], sd["backbone.conv1.3.weight"][2, 1]
    )
    np.testing.assert_array_equal(p["stem_bn3"]["bn"]["scale"], sd["backbone.bn1.weight"])
    np.testing.assert_array_equal(s["stem_bn3"]["bn"]["var"], sd["backbone.bn1.running_var"])
    np.testing.assert_array_equal(
        s["layer4_1"]["bn2"]["bn"]["mean"], sd["backbone.layer4.1.bn2.running_mean"]
    )
    # LAD's 4-channel teacher stem: RGB filters kept, channel 3 = 0.1 * randn.
    four = segformer_loading.load_resnet18_v1b(path, in_channels=4)["params"]["stem_conv1"]
    np.testing.assert_array_equal(four["kernel"][:, :, :3], p["stem_conv1"]["kernel"])
    assert four["kernel"].shape[2] == 4 and 0.02 < np.std(four["kernel"][:, :, 3]) < 0.3

    # stage_source.graft_pretrained puts params and batch_stats into the "backbone" sub-tree of
    # every seed and leaves the rest of the student alone.
    seeds = 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    stack = lambda t: jax.tree.map(lambda v: jnp.stack([v] * seeds), t)  # noqa: E731
    state = kd.TrainState(
        step=jnp.zeros(seeds, jnp.int32),
        params={"student": stack(want["params"])},
        opt_state=None,
        rng=jnp.zeros((seeds, 2), jnp.uint32),
        model_state={"student": {"batch_stats": stack(want["batch_stats"])}},
    )
    shard = types.SimpleNamespace(
        params={"student": jax.tree.map(lambda _: rep, state.params["student"])},
        model_state={"student": jax.tree.map(lambda _: rep, state.model_state["student"])},
    )
    stage = types.SimpleNamespace(cfg=types.SimpleNamespace(num_seeds=seeds), state_shardings=shard)
    new = stage_source.graft_pretrained(stage, state, f"pretrained:resnet18_v1b:{path}")
    np.testing.assert_array_equal(
        new.params["student"]["backbone"]["layer3_0"]["conv1"]["kernel"][1],
        p["layer3_0"]["conv1"]["kernel"],
    )
    np.testing.assert_array_equal(
        new.model_state["student"]["batch_stats"]["backbone"]["stem_bn1"]["bn"]["mean"][0],
        s["stem_bn1"]["bn"]["mean"],
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        new.params["student"]["aspp"],
        state.params["student"]["aspp"],
    )
    assert pretrained.load_variables(f"resnet18_v1b:{path}").keys() == {"params", "batch_stats"}

    del sd["backbone.layer3.1.bn2.running_var"]
    save_file(sd, path)
    with pytest.raises(KeyError, match=r"'backbone.layer3.1.bn2.running_var'.*\(16,\)"):
        segformer_loading.load_resnet18_v1b(path)


def test_mit_graft_into_segformer():
    model = segformer.SegFormer(variant="tiny", num_classes=3, heads=TINY["heads"])
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    loaded = pretrained.load(f"mit:{MIT_FILE}")
    # The file fits exactly the "encoder" sub-tree (what stage_source.graft_pretrained looks for).
    check_shapes(v["params"]["encoder"], loaded, "encoder")
    assert [k for k, sub in v["params"].items() if not check_shapes_bad(sub, loaded)] == ["encoder"]


def check_shapes_bad(want, got):
    from kd_jax.models import shape_mismatches

    return shape_mismatches(want, got)


def test_params_only_bn_teacher_gets_init_batch_stats():
    # teacher._init_missing: a BatchNorm teacher loaded from a params-only file.
    model = deeplab.DeepLabV3(num_classes=3, stem_widths=STEM, widths=WIDTHS, aspp_features=8)
    example = (jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example)
    params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), shapes["params"])
    out = teacher_lib._init_missing(model, {"params": params}, shapes, example, "some/file")
    assert set(out) == {"params", "batch_stats"} and out["params"] is params
    bs = out["batch_stats"]["backbone"]["stem_bn1"]["bn"]
    np.testing.assert_array_equal(bs["mean"], 0.0)
    np.testing.assert_array_equal(bs["var"], 1.0)
    model.apply(out, jnp.zeros((1, 16, 16, 3)))  # eval-mode apply works.
