"""`python -m kd_jax.export`: the CLI of `kd_jax.export.export` (a UserError exits 2)."""

from __future__ import annotations

import argparse
import logging
import sys

from kd_jax.errors import UserError
from kd_jax.export import DTYPES, FORMATS, export


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m kd_jax.export", description="Export a distilled student."
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", default=None, help="stage name (default: the only one)")
    p.add_argument("--seed", type=int, default=0, help="seed replica index")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: final)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokenizer", default=None, help="a .gguf or HF tokenizer directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--allow_unfinished",
        action="store_true",
        help="export the newest checkpoint of a stage that has not finished",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        res = export(
            args.workdir,
            args.stage,
            out=args.out,
            format=args.format,
            seed=args.seed,
            step=args.step,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
            allow_unfinished=args.allow_unfinished,
        )
    except UserError as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kd_jax export error: {msg}", file=sys.stderr)
        return 2
    print(
        f"exported stage '{res['stage']}' step {res['step']} seed {res['seed']} "
        f"({res['model']}, {res['format']}) to {args.out}:"
    )
    for f in res["files"]:
        print(f"  {f}")
    return 0
