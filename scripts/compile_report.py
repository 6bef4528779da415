"""Sums a KD_JAX_COMPILE_REPORT file (tests/conftest.py): the slowest tests with the programs they
built (`programs`: compiled by XLA or loaded from the persistent cache; `hits`: of those, loaded),
the seconds that took, and the totals.

    KD_JAX_COMPILE_REPORT=/tmp/compiles.jsonl bash scripts/test.sh
    python scripts/compile_report.py /tmp/compiles.jsonl [--top 15]
"""

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("report")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    with open(args.report) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: -r["seconds"])
    print(f"{'seconds':>8} {'programs':>8} {'build s':>8} {'hits':>5}  test")
    for r in rows[: args.top]:
        print(
            f"{r['seconds']:8.1f} {r['compiles']:8d} {r['compile_s']:8.1f} "
            f"{r['cache_hits']:5d}  {r['test']}"
        )
    total = {k: sum(r[k] for r in rows) for k in ("seconds", "compiles", "compile_s", "cache_hits")}
    print(
        f"{len(rows)} tests: {total['seconds']:.0f} test-seconds; {total['compiles']} programs "
        f"built in {total['compile_s']:.0f} s, {total['cache_hits']} of them cache hits"
    )


if __name__ == "__main__":
    main()
