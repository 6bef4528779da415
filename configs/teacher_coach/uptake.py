r"""Teacher coach on real NCTE uptake ratings: zero-shot LLM scoring, then distilling the coach
(experiments/teacher_coach/README.md; Wang & Demszky 2023, arXiv:2306.03090).

Data: the vendored uptake exchanges (`kd_jax/data/ncte_uptake`, 1,998 rated student -> teacher
exchanges, 774 observations), split by observation (`obs_id`; 20% of observations held out,
seed 0), so no lesson is in both train and test.

Stages:
  score       SmolLM2-135M-Instruct rates `limit` train and `limit` test exchanges of the item
              "uptake" (0-2) with prompt variants DA and DA+ (and RA on `limit_ra` test
              exchanges): greedy answers on the test split (strict parser), p(score) over the
              allowed score tokens everywhere -> records + agreement with the human ratings.
  distil      all-MiniLM-L6-v2 + 3-way head, KL to the teacher's DA distribution
              p(0), p(1), p(2) on the scored train exchanges (`hinton_kd`, T = 1, targets read from
              the batch: teacher="batch:teacher_logprobs").
  supervised  the same student, same exchanges, CE on the human label (rater mean rounded).
Students are evaluated on the held-out observations with evaluator "rating_agreement"
(Spearman/Pearson of the expected rating vs `uptake` and `uptake_zscore` with cluster-bootstrap
intervals, kappa vs the rounded mean).

  python -m kd_jax.main --config=configs/teacher_coach/uptake.py --workdir=runs/coach_uptake
  python -m kd_jax.main --config=configs/teacher_coach/uptake.py:limit=300,limit_ra=60 ...

`tiny`: a random 1 x 16 decoder with SmolLM2's vocabulary as the teacher, a random 1-layer
BERT (MiniLM's WordPiece vocabulary) as the student, a handful of exchanges: seconds, for CI.
"""

from kd_jax import config as C

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        limit=96,  # test exchanges scored (DA, DA+ answers and p(score))
        limit_train=160,  # train exchanges scored (DA p(score) only: the distillation targets)
        limit_ra=32,  # RA answers (64 new tokens each) on the first N test exchanges
        variants="DA,DA+,RA",
        steps=60,
        seeds=3,
        max_length=64,
    )
    variants = tuple(v for v in arg.variants.split(",") if v)
    c = C.base_config()
    c.num_seeds = arg.seeds
    c.seeds_in_step = "vmap"
    c.data.name = "ncte_uptake"
    data = dict(max_length=arg.max_length, test_fraction=0.2, split_seed=0)
    c.data.kwargs = data
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
    c.student = C.model("bert_classifier", preset=MINILM, num_classes=3, pooling="mean")
    c.student.init = f"pretrained:{MINILM}"
    c.evaluator = "rating_agreement"
    # Also on the first `limit` held-out exchanges: the ones the LLM teacher scored.
    c.evaluator_kwargs = {"levels": (0, 1, 2), "bootstrap": 1000, "first_n": arg.limit}
    c.optimizer.learning_rate = 5e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.schedule.warmup_steps = max(1, arg.steps // 10)
    c.steps = arg.steps
    c.log_every, c.eval_every = 50, 0
    c.progress_bar = False

    teacher = C.model("llama", preset=SMOLLM2)
    teacher.init = f"pretrained:{SMOLLM2}"
    score = dict(
        source="ncte_uptake",
        splits=("train", "test"),
        generate_splits=("test",),
        limit=arg.limit,
        limit_train=arg.limit_train,
        limit_ra=arg.limit_ra,
        max_words=50,
        items=("uptake",),
        variants=variants,
        max_new_tokens=6,
        max_new_tokens_ra=64,
        batch_size=16,
        bootstrap=1000,
    )
    scored = dict(data, teacher_scores="{workdir}/score", teacher_item="uptake")
    c.stages = {
        "score": {"kind": "score", "teacher": teacher, "score": score},
        "distil": {
            "data": {"kwargs": dict(scored, teacher_variant="DA")},
            "objective": {
                "kd": C.term("hinton_kd", 1.0, teacher="batch:teacher_logprobs", temperature=1.0)
            },
        },
        "supervised": {
            "data": {"kwargs": dict(scored, teacher_variant="DA")},
            "objective": {"ce": C.term("ce")},
        },
    }
    c.stage_order = ("score", "distil", "supervised")
    if arg.tiny:
        tiny_teacher = C.model(
            "llama", vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1
        )
        tiny_teacher.init = "random:0"
        c.stages.score.teacher = tiny_teacher
        c.stages.score.score = dict(
            score,
            limit=8,
            limit_train=8,
            limit_ra=4,
            batch_size=8,
            max_new_tokens_ra=8,
            bootstrap=20,
        )
        c.student = C.model(
            "bert_classifier",
            vocab_size=30522,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            num_classes=3,
            pooling="mean",
        )
        c.student.init = ""
        for name in ("distil", "supervised"):
            c.stages[name].data.kwargs.update(max_length=32, limit_eval=16)
        c.data.kwargs = dict(data, max_length=32, limit_eval=16)
        c.data.batch_size, c.data.eval_batch_size = 8, 8
        c.evaluator_kwargs = {"levels": (0, 1, 2), "bootstrap": 20, "first_n": 8}
        c.num_seeds, c.steps, c.log_every = 2, 2, 1
        c.schedule.warmup_steps = 1
    return c


TEST_VARIANTS = ()  # tests/test_teacher_coach.py runs `tiny` (and checks its records).
