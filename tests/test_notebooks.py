"""Executes the Colab notebooks top to bottom (no library code lives in them)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs(name):
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
