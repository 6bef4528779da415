"""Qwen2 GGUF loading: a tiny random Qwen2 written with gguf.GGUFWriter
(scripts/make_qwen2_fixture.py) loads into `llama.Llama` (q/k/v biases, RoPE theta from the
metadata, no q/k un-permutation, untied head) and matches a NumPy forward pass of the same
tensors; KV-cache generation equals step-by-step full forwards; the "qwen2" pre-tokenizer; a
score stage with a GGUF teacher. The transformers parity test uses the committed fixture and
skips when torch, transformers or accelerate (which transformers needs for GGUF) is missing."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from kd_jax import config as C
from kd_jax import sharding, trainers
from kd_jax.data import records
from kd_jax.models import gguf_loading, llama
from kd_jax.models.generate import generate
from kd_jax.tokenizers import BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "qwen2_tiny.gguf")
_spec = importlib.util.spec_from_file_location(
    "make_qwen2_fixture", os.path.join(ROOT, "scripts", "make_qwen2_fixture.py")
)
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return maker.write(str(tmp_path_factory.mktemp("qwen2") / "tiny.gguf"), seed=3)


def numpy_qwen2(t: dict, ids: np.ndarray) -> np.ndarray:
    """Reference Qwen2 forward (float64) from GGUF tensors in HF order: logits [T, V]."""
    a = maker.ARCH
    d, h, kv = a["hidden"], a["heads"], a["kv_heads"]
    dh, n = d // h, len(ids)
    t = {k: v.astype(np.float64) for k, v in t.items()}

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + a["eps"]) * w

    ang = np.arange(n)[:, None] * (1.0 / a["rope_theta"] ** (np.arange(0, dh, 2) / dh))[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [T, heads, dh], rotate_half convention
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    x = t["token_embd.weight"][ids]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(a["layers"]):
        p = lambda k, i=i: t[f"blk.{i}.{k}"]  # noqa: E731
        y = rms(x, p("attn_norm.weight"))
        q = rope((y @ p("attn_q.weight").T + p("attn_q.bias")).reshape(n, h, dh))
        k = rope((y @ p("attn_k.weight").T + p("attn_k.bias")).reshape(n, kv, dh))
        v = (y @ p("attn_v.weight").T + p("attn_v.bias")).reshape(n, kv, dh)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(dh)
        s = np.where(causal[None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", w, v).reshape(n, d) @ p("attn_output.weight").T
        y = rms(x, p("ffn_norm.weight"))
        g = y @ p("ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (y @ p("ffn_up.weight").T)) @ p("ffn_down.weight").T
    return rms(x, t["output_norm.weight"]) @ t["output.weight"].T


def test_qwen2_gguf_matches_numpy_reference(gguf_file):
    config, params = gguf_loading.load_gguf(gguf_file)
    assert config.attention_bias and not config.tie_embeddings
    assert config.rope_theta == 1e6 and config.rms_norm_eps == pytest.approx(1e-6)
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 2, 2)
    t = maker.tensors(seed=3)
    layers = params["params"]["layers"]
    np.testing.assert_array_equal(layers["q_proj"]["kernel"][1], t["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(layers["k_proj"]["bias"][0], t["blk.0.attn_k.bias"])
    ids = np.array([[5, 77, 256, 3, 120, 9, 200, 41, 13, 8]], np.int32)
    logits, _ = llama.Llama(config).apply(params, ids)
    want = numpy_qwen2(t, ids[0])
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=2e-4, rtol=2e-4)


def test_qwen2_kv_cache_generation_matches_full_forward(gguf_file):
    config, params = gguf_loading.load_gguf(gguf_file)
    model = llama.Llama(config)
    prompt = np.array([[11, 57, 90, 33, 200]], np.int32)
    out = generate(model, params, prompt, max_new_tokens=6)
    seq = list(prompt[0])
    for _ in range(6):
        logits, _ = model.apply(params, np.asarray([seq], np.int32))
        seq.append(int(np.argmax(logits[0, -1])))
    assert np.asarray(out["tokens"][0]).tolist() == seq[5:]
    np.testing.assert_allclose(
        np.asarray(out["first_logits"][0]),
        np.asarray(model.apply(params, prompt)[0][0, -1]),
        atol=1e-5,
    )


def test_qwen2_pre_tokenizer(gguf_file):
    tok = BPETokenizer.from_gguf(gguf_file)
    ids = tok.encode("the student's 123\n\nok")
    pieces = [tok._tok.id_to_token(i) for i in ids]
    # Merges apply inside words, digits are single tokens, "'s" is split off the word.
    assert pieces == ["t", "he", "Ġst", "u", "d", "e", "n", "t", "'", "s", "Ġ", "1", "2", "3"] + [
        "Ċ",
        "Ċ",
        "o",
        "k",
    ]
    assert tok.decode(ids) == "the student's 123\n\nok"
    assert tok.stop_ids == (tok.token_to_id("<|im_end|>"),)


def test_score_stage_with_a_gguf_teacher(gguf_file, tmp_path):
    c = C.base_config()
    c.kind = "score"
    c.teacher = C.model("llama", preset=f"gguf:{gguf_file}")
    c.teacher.init = f"pretrained:gguf:{gguf_file}"
    c.score = dict(limit=2, batch_size=2, max_new_tokens=2, bootstrap=0, plot=False, max_words=5)
    cfg = C.stage_config(C.validate(c), None)
    out = str(tmp_path / "score")
    ctx = trainers.RunContext(sharding.make_mesh(c.mesh), str(tmp_path), out, {})
    res = trainers.TRAINERS.get("score")(cfg, ctx)
    assert res["records"] == 2 and records.read_manifest(out)["tokenizer"] == "tiny.gguf"
    assert all(r["probs"].shape == (3,) for r in records.read_dataset(out))


def test_transformers_gguf_parity():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads a GGUF file only with accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(FIXTURE), gguf_file=os.path.basename(FIXTURE), torch_dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(FIXTURE), gguf_file=os.path.basename(FIXTURE)
    )
    tok = BPETokenizer.from_gguf(FIXTURE)
    text = "the student's answer is 42, then the teacher asks why."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = np.asarray([tok.encode(text)], np.int32)
    with torch.no_grad():
        want = model(torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
    config, params = gguf_loading.load_gguf(FIXTURE)
    got = np.asarray(llama.Llama(config).apply(params, ids)[0][0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert jax.numpy.argmax(got[-1]) == int(np.argmax(want[-1]))
