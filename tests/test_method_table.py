"""The CPU method table's driver (experiments/classic/method_table.py) on a tiny run."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "method_table", os.path.join(ROOT, "experiments", "classic", "method_table.py")
)
method_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(method_table)


def test_tiny_method_table_row_per_stage(tmp_path):
    run = method_table.run_dataset("digits", str(tmp_path / "digits"), tiny=True, method="cwd")
    config, results, walls = run
    assert list(results) == ["teacher", "cwd"] and all(w > 0 for w in walls.values())
    md = method_table.table({"digits": run})
    lines = md.splitlines()
    assert len(lines) == 4 and lines[3].startswith("| CWD | 1·ce + 1·cwd (conv1, conv1x1) |")
