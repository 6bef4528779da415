r"""The non-distilled baseline of MiniLM (Wang et al., NeurIPS 2020, arXiv:2002.10957, Sec. 4,
which compares its distilled students with small BERTs pre-trained directly): the same student
pre-trained from scratch with BERT's masked-language-model objective (Devlin et al. 2019,
arXiv:1810.04805, Sec. 3.1), no teacher.

Student: `bert_mlm`, the 3 x 384 (12 heads) BERT of configs/minilm/minilm_v1.py plus BERT's MLM
head (dense + GELU + LayerNorm, decoder tied to the word embeddings); data: the same ShareGPT
turns, tokenised with the teacher's WordPiece; stage kind "mlm" masks 15% of the real,
non-special tokens (80% [MASK] / 10% random / 10% kept, `kd_jax.trainers.mlm`); loss `mlm_ce`
(mean CE over the masked tokens of the batch). Optimiser: exactly v1's (Adam (0.9, 0.999),
wd 0.01, lr 3e-4, linear warm-up and decay), so only the objective differs from the v1 arm. The
head is training-only: the encoder (params["encoder"]) exports as a HF BertModel and is
evaluated like the distilled students (experiments/minilm/run_ablation.py, arm "mlm").

Arguments:
  tiny=1            seconds on a CPU (CI).

  python -m kd_jax.main --config=configs/minilm/mlm_scratch.py --workdir=runs/minilm_mlm
Measured: see experiments/minilm/README.md, "Longer ablation" (the mlm rows).
"""

from kd_jax import config as C

TEACHER = "all-minilm-l6-v2"  # only its architecture preset and tokenizer; no teacher runs.


def get_config(arg=None):
    arg = C.parse_arg(arg, tiny=False)
    c = C.base_config()
    c.kind = "mlm"
    c.data.name = "sharegpt_text"
    c.data.kwargs = {"max_length": 128, "limit": 20000, "num_eval": 1000}
    c.data.batch_size = c.data.eval_batch_size = 32
    c.evaluator = "none"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.schedule.warmup_steps = 100
    c.steps, c.log_every = 2000, 20
    c.sharding_rules = (("student/.*kernel", "fsdp"), (".*", "replicate"))
    c.student = C.model(
        "bert_mlm", preset=TEACHER, num_layers=3, hidden_size=384, intermediate_size=1536
    )
    c.objective = {"mlm": C.term("mlm_ce")}
    # config.mlm keeps its defaults: BERT's 15% / 80-10-10 masking, bert-base-uncased ids.
    if arg.tiny:
        c.data.kwargs = {"max_length": 32, "limit": 300, "num_eval": 32}
        c.data.batch_size = c.data.eval_batch_size = 8
        c.steps, c.log_every, c.progress_bar = 3, 1, False
        c.schedule.warmup_steps = 1
    return c
