"""Executes the Colab notebooks top to bottom (no library code lives in them)."""

import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")


# segmentation.ipynb compiles three SegFormer stages plus CSF/PEA in a fresh kernel: about
# 5 min on the 2-core CI machine, a third of the suite's budget. It runs with KD_JAX_SLOW=1.
SLOW = pytest.mark.skipif(
    os.environ.get("KD_JAX_SLOW") != "1", reason="slow notebook; set KD_JAX_SLOW=1 to run it"
)


@pytest.mark.parametrize(
    "name",
    [
        "quickstart.ipynb",
        "minilm.ipynb",
        "orca.ipynb",
        "teacher_coach.ipynb",
        "monotakd.ipynb",
        "polyvilt.ipynb",
        pytest.param("segmentation.ipynb", marks=SLOW),
    ],
)
def test_notebook_runs(name, monkeypatch):
    # orca.ipynb: a random 2-layer teacher with SmolLM2's tokenizer instead of SmolLM2 itself
    # (loading + compiling the 135M model's generation on CPU takes over a minute).
    monkeypatch.setenv("KD_JAX_NOTEBOOK_TINY", "1")
    # The kernel imports this tree's kd_jax, so each notebook's install cell (git clone + pip in
    # Colab) is skipped: no network here.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    )
    # The test processes' persistent compilation cache (conftest.py), so a rerun of the suite
    # finds a notebook's programs compiled. (The kernel keeps JAX's one CPU device: with the
    # test mesh's eight, the MiniLM notebook took 51 s instead of 30 in one suite run.)
    for option in (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ):
        monkeypatch.setenv(option.upper(), str(getattr(jax.config, option)))
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": COLAB}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    install = next(c for c in nb.cells if c.cell_type == "code" and "REPO = " in c.source)
    printed = "".join(o.get("text", "") for o in install.get("outputs", []))
    assert f"from {os.path.join(ROOT, 'kd_jax')}" in printed, printed
