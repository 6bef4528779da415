"""Every user mistake is a `kd_jax.errors.UserError` (issue #27, item 4).

(a) A walk over kd_jax's source: every `raise` of a builtin exception class is either listed
below as an internal invariant (no config value, CLI flag, environment variable or user file
can trigger it), with its reason, or fails this test naming file:line. A user's mistake raises a
UserError kind instead (they also derive from the builtin each replaces, so callers that catch
the builtin keep working).

(b) The mistakes that used to surface as a traceback deep in a stage, reproduced through the
real entry points, each asserting that the message names the key, file or record and the fix.
"""

from __future__ import annotations

import ast
import builtins
import json
import pathlib

import pytest

from kd_jax import config as C
from kd_jax import hostmem, main, prompts
from kd_jax.data import lpm, segmentation
from kd_jax.data.registry import SOURCES
from kd_jax.errors import (
    ConfigValueError,
    CorruptFileError,
    UserError,
    UserFileNotFoundError,
)

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kd_jax"
BUILTIN_EXCEPTIONS = {
    name
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
}

# (file under kd_jax/, function qualname) -> why no user input can reach the raise.
INTERNAL = {
    ("adapters.py", "Adapter.__call__"): "kind is set by the two registered factories",
    ("checkpoint.py", "Checkpointer.save"): "read-only checkpointers (restore, export) never save",
    ("data/lectures.py", "render_figure"): "kind is drawn from KINDS by the generator",
    ("data/segmentation.py", "_shape_mask"): "kind is drawn from SHAPES by render_shapes",
    ("data/segmentation.py", "ShapesSegmentation.__getitem__"): "the sequence protocol",
    ("data/sources.py", "ArraySource.__init__"): "loaders build the arrays from one set of rows",
    ("evaluators/__init__.py", "register"): "extension code's registration, at import time",
    ("evaluators/agreement.py", "cohen_kappa"): "callers pass the weights as literals",
    ("evaluators/kitti_ap.py", "iou_2d"): "callers pass the criterion as a literal",
    ("evaluators/kitti_ap.py", "rotated_iou_bev"): "callers pass the criterion as a literal",
    ("evaluators/retrieval.py", "best_ranks"): "every query's own slide is among the candidates",
    ("evaluators/segmentation.py", "confusion_matrix"): "logits are resized to the label first",
    ("export/base.py", "register"): "extension code's registration, at import time",
    ("export/base.py", "check_formats"): "a format without a writer is a packaging bug",
    ("models/generate.py", "generate"): "callers always pass an rng when they sample",
    ("models/llama.py", "Llama.__call__"): "generate sizes the KV cache for prompt + new tokens",
    ("models/transkd.py", "SelectiveFusion.__call__"): "CSF passes the residual to fusing stages",
    ("registry.py", "Registry.register.add"): "extension code's registration, at import time",
    ("runner.py", "stop_on_signals.handle"): "the SIGINT handler unwinds as Ctrl-C does",
    ("tokenizers.py", "BPETokenizer.__call__"): "callers pass padding_side as a literal",
}
# Raises in files another session is converting (the lead's): each is user-reachable and gets a
# UserError kind there; remove an entry once its file no longer raises the builtin.
PENDING: dict[tuple[str, str], str] = {}


class _Raises(ast.NodeVisitor):
    """Collects (file, qualname, line, name) of the builtin raises of one module."""

    def __init__(self, rel: str, found: list):
        self.rel, self.found, self.scope = rel, found, []

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Raise(self, node):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in BUILTIN_EXCEPTIONS:
            where = ".".join(self.scope) or "<module>"
            self.found.append((self.rel, where, node.lineno, exc.id))


def _builtin_raises():
    """[(file, qualname, line, name)] of every `raise <Builtin>(...)` / `raise <Builtin>`."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        _Raises(rel, found).visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_every_builtin_raise_is_an_internal_invariant():
    raises = _builtin_raises()
    bad = [
        f"kd_jax/{f}:{line}: raise {name} in {fn}"
        for f, fn, line, name in raises
        if (f, fn) not in INTERNAL and (f, fn) not in PENDING
    ]
    assert not bad, (
        "A user's mistake raises a kd_jax.errors.UserError kind naming the key, file or line and "
        "the fix; list a raise in INTERNAL (with its reason) only if no config value, flag, "
        "environment variable or user file can reach it:\n" + "\n".join(bad)
    )
    listed = {(f, fn) for f, fn, _, _ in raises}
    stale = sorted(set(INTERNAL) - listed) + sorted(set(PENDING) - listed)
    assert not stale, f"entries without a builtin raise any more (remove them): {stale}"


def test_the_walk_finds_raises_by_qualname():
    src = (
        "class A:\n    def f(self):\n        def g():\n            raise KeyError('x')\n"
        "def h():\n    raise ValueError\n    raise ConfigValueError('not builtin')\n"
    )
    found = []
    _Raises("m.py", found).visit(ast.parse(src))
    assert found == [("m.py", "A.f.g", 4, "KeyError"), ("m.py", "h", 6, "ValueError")]


# ------------------------------------------------------------------ settings (config.validate)
def _config_file(tmp_path, body: str = "") -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        "from kd_jax.config import base_config\n\n"
        "def get_config(arg=None):\n"
        "    c = base_config()\n"
        "    c.stages.kd = {'steps': 3}\n"
        "    c.stage_order = ('kd',)\n"
        f"{body}"
        "    return c\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "override,match",
    [
        ("num_seeds=0", r"config\.num_seeds=0: independent replicas .*integer >= 1"),
        ("log_every=0", r"config\.log_every=0: steps between metric lines; .*integer >= 1"),
        ("eval_every=-1", r"config\.eval_every=-1: .*integer >= 0"),
        ("checkpoint_every=-5", r"config\.checkpoint_every=-5: .*integer >= 0"),
        ("keep_checkpoints=0", r"config\.keep_checkpoints=0: .*integer >= 1"),
        ("steps=-1", r"config\.steps=-1: .*integer >= 0"),
        ("data.batch_size=0", r"config\.data\.batch_size=0: .*integer >= 1"),
        ("data.eval_batch_size=0", r"config\.data\.eval_batch_size=0: .*integer >= 1"),
        ("stages.kd.log_every=0", r"config\.stages\.kd\.log_every=0: .*integer >= 1"),
        ("stages.kd.num_seeds=0", r"config\.stages\.kd\.num_seeds=0: .*integer >= 1"),
        ("seeds_in_step='pmap'", r"config\.seeds_in_step='pmap': use one of \['vmap', 'unroll'\]"),
        ("teacher.placement='shard'", r"config\.teacher\.placement='shard': use one of"),
        ("divergence_factor=-1.0", r"config\.divergence_factor=-1\.0: .*number >= 0"),
    ],
)
def test_out_of_range_settings_fail_at_load(tmp_path, override, match):
    """`num_seeds=0` used to fail deep in the stage ("Need at least one array to stack"),
    `log_every=0` with a ZeroDivisionError after the first step: both now fail at load."""
    with pytest.raises(ConfigValueError, match=match):
        C.load(_config_file(tmp_path), [override])


def test_a_config_file_with_num_seeds_zero_is_one_line_and_exit_2(tmp_path, capsys):
    spec = _config_file(tmp_path, "    c.num_seeds = 0\n")
    assert main.main(["--config", spec, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.num_seeds=0" in err and "integer >= 1" in err
    assert not (tmp_path / "w").exists()  # nothing ran


def test_valid_settings_still_load(tmp_path):
    cfg = C.load(_config_file(tmp_path), ["steps=0", "eval_every=0", "prng_impl='rbg'"])
    assert cfg.steps == 0 and cfg.prng_impl == "rbg"


# ------------------------------------------------------------------------ user files: LPM
def _lpm_speaker(root, figs, slides, capfig, speaker="sp"):
    d = root / speaker
    d.mkdir(parents=True)
    (d / f"{speaker}_figs.json").write_text(json.dumps(figs))
    (d / f"{speaker}.json").write_text(json.dumps(slides))
    (d / f"{speaker}_capfig.json").write_text(json.dumps(capfig))
    return d


def test_lpm_figure_without_a_field_names_file_record_and_field(tmp_path):
    d = _lpm_speaker(tmp_path, {"f1": {"scene_id": ["c", "slide_1"]}}, {}, {"s1": ["f1"]})
    with pytest.raises(CorruptFileError) as e:
        lpm.read_lpm(str(tmp_path), speakers=["sp"], layout="json")
    msg = str(e.value)
    assert str(d / "sp_figs.json") in msg and "figure 'f1'" in msg
    assert "lacks field 'slide_figure'" in msg and "fix the record" in msg
    box = {"left": 1, "top": 2, "width": 3}  # no height
    (d / "sp_figs.json").write_text(json.dumps({"f1": {"slide_figure": box, "scene_id": "x"}}))
    with pytest.raises(CorruptFileError, match=r"figure 'f1' lacks field 'height'"):
        lpm.read_speaker(str(tmp_path), "sp")


def test_lpm_slide_without_figures_or_scene_id_names_the_slide(tmp_path):
    d = _lpm_speaker(tmp_path, {}, {"s1": {"captions": []}}, {"s1": []})
    with pytest.raises(CorruptFileError) as e:
        lpm.read_speaker(str(tmp_path), "sp")
    msg = str(e.value)
    assert str(d / "sp.json") in msg and "slide 's1'" in msg and "lacks field 'scene_id'" in msg


def test_lpm_file_of_the_wrong_shape_is_a_corrupt_file(tmp_path):
    _lpm_speaker(tmp_path, [], {}, {})
    with pytest.raises(CorruptFileError, match=r"sp_figs\.json: the figure json is a JSON list"):
        lpm.read_speaker(str(tmp_path), "sp")


# ------------------------------------------------------------------ user files: segmentation
@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("cityscapes", {}, r"Cityscapes split 'train' not found .*data\.kwargs\.data_dir.*"),
        ("acdc", {}, r"ACDC condition 'fog' split 'train' not found .*data\.kwargs\.data_dir"),
        ("voc", {}, r"Pascal VOC list .*train\.txt' not found \(data\.kwargs\.data_dir"),
    ],
)
def test_segmentation_dir_without_the_split_is_a_user_error(tmp_path, name, kwargs, match):
    with pytest.raises(UserFileNotFoundError, match=match) as e:
        SOURCES.get(name)(data_dir=str(tmp_path), **kwargs)
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, FileNotFoundError)  # callers catching the builtin still do


def test_cityscapes_split_without_images_is_a_user_error(tmp_path):
    for sub in ("leftImg8bit", "gtFine"):
        (tmp_path / sub / "train").mkdir(parents=True)
    with pytest.raises(UserFileNotFoundError, match=r"No images in .*leftImg8bit/train"):
        segmentation.cityscapes_split(str(tmp_path), "train")


def test_augment_scale_without_crop_names_the_keys():
    with pytest.raises(ConfigValueError, match=r"data\.kwargs\.augment\.scale_range needs "):
        SOURCES.get("shapes_seg")(num_train=2, num_eval=2, augment={"scale_range": (0.5, 2.0)})


# -------------------------------------------------------- environment variables, templates
def test_host_malloc_variable_names_the_variable_and_the_values():
    with pytest.raises(ConfigValueError, match=r"KD_JAX_HOST_MALLOC='fast'.*'system'.*'tuned'"):
        hostmem.tuned_env({"KD_JAX_HOST_MALLOC": "fast"})


def test_prompt_template_inputs_are_checked_naming_the_template():
    prompts.check_inputs("uptake", "DA", {"student", "teacher"})
    with pytest.raises(ConfigValueError) as e:
        prompts.check_inputs("CLPC", "RA", {"student", "teacher"})
    assert "CLPC.json" in str(e.value) and "variant 'RA'" in str(e.value)
    assert "['transcript']" in str(e.value)


def test_prompt_template_without_fields_is_a_corrupt_file(tmp_path, monkeypatch):
    (tmp_path / "teacher_coach").mkdir()
    (tmp_path / "teacher_coach" / "X.json").write_text(json.dumps({"item": "X"}))
    (tmp_path / "teacher_coach" / "Y.json").write_text("{not json")
    monkeypatch.setattr(prompts, "HERE", str(tmp_path))
    prompts.load.cache_clear()
    try:
        with pytest.raises(CorruptFileError, match=r"X\.json lacks fields \['definition'"):
            prompts.load("X")
        with pytest.raises(CorruptFileError, match=r"prompt template .*Y\.json"):
            prompts.load("Y")
    finally:
        prompts.load.cache_clear()


def _stage(kind: str, **settings):
    c = C.base_config()
    c.kind = kind
    c[kind if kind == "score" else "generate"] = settings
    return C.stage_config(C.validate(c), None)


def test_score_settings_check_items_against_the_source_before_any_stage():
    from kd_jax.trainers import score

    with pytest.raises(ConfigValueError, match=r"item 'uptake' scores exchanges.*'ncte_uptake'"):
        score.settings(_stage("score", source="ncte", splits=("all",), items=("uptake",)))
    with pytest.raises(ConfigValueError, match=r"score\.splits=\('test',\).*\('all',\)"):
        score.settings(_stage("score", source="ncte", items=("CLPC",)))
    with pytest.raises(ConfigValueError, match=r"score\.train_variants: 'XX'"):
        score.settings(_stage("score", train_variants=("XX",)))
    assert score.settings(_stage("score", variants=("DA", "RA", "DA+")))["items"] == ("uptake",)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"batch_size": 0}, r"generate\.batch_size=0: .*integer >= 1"),
        ({"rows_per_shard": 0}, r"generate\.rows_per_shard=0"),
        ({"top_p": 0.0}, r"generate\.temperature=0\.7, top_p=0\.0: use"),
        ({"logprob_dtype": "bfloat16"}, r"generate\.logprob_dtype='bfloat16': use"),
        ({"source": "flan"}, r"generate\.source 'flan': only 'sharegpt'"),
    ],
)
def test_generate_settings_are_checked_in_preflight(settings, match):
    from kd_jax.trainers import _shards

    with pytest.raises(ConfigValueError, match=match):
        _shards.settings(_stage("generate", **settings))


def test_every_user_error_kind_keeps_its_builtin():
    from kd_jax import errors

    for name in ("ConfigValueError", "CorruptFileError", "UnsupportedFileError"):
        assert issubclass(getattr(errors, name), (UserError, ValueError))
    assert issubclass(errors.FileEntryError, KeyError)
    assert str(errors.FileEntryError("a 'b' c")) == "a 'b' c"  # not KeyError's quoted repr
