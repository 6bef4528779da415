"""Shared by the scripts/make_<paper>_fixture.py scripts: their command line (the user's checkout
of the official repository, its commit, the output file) and the extraction of a release's
top-level classes and functions from a module file whose imports need packages (timm, mmcv,
CUDA ops) the fixture does not."""

from __future__ import annotations

import argparse
import ast
import subprocess

PRELUDE = (
    "import numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
)


def checkout_args(default_out: str) -> argparse.Namespace:
    """`<checkout> [--commit C] [--out F]`; `commit` defaults to the checkout's HEAD."""
    ap = argparse.ArgumentParser()
    ap.add_argument("checkout")
    ap.add_argument("--commit", default=None, help="the checkout's commit (recorded)")
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    if args.commit is None:
        r = subprocess.run(["git", "-C", args.checkout, "rev-parse", "HEAD"], capture_output=True)
        args.commit = r.stdout.decode().strip() or "unknown"
    return args


def top_level_defs(path: str, names, prelude: str = "") -> dict:
    """Executes only the named top-level classes / functions of the module file `path` (after
    numpy and torch imports and `prelude`); -> their namespace."""
    src = open(path).read()
    keep = [n for n in ast.parse(src).body if getattr(n, "name", None) in names]
    assert {n.name for n in keep} == set(names), f"{names} not all in {path}"
    code = PRELUDE + prelude + "\n\n".join(ast.get_source_segment(src, n) for n in keep)
    ns: dict = {}
    exec(compile(code, path, "exec"), ns)
    return ns
