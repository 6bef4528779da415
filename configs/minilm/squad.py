r"""Fine-tuning a (distilled) BERT encoder on SQuAD 2.0 span extraction .

Data: the user's prepared TFDS `squad/v2.0` (array_record, `tfds.data_source`, no TensorFlow,
nothing downloaded); train on `train`, evaluate on `validation`. A missing dataset is an error
naming the expected `<data_dir>/squad/v2.0/3.0.0/` layout. Each question + context is ONE
sequence of max length 384 (question <= 64 tokens, context truncated; no doc-stride windows, so
answers beyond the window are labelled "no answer"; see kd_jax/data/squad.py).
Model: `bert_qa` = BERT encoder + Dense(2) start/end logits over context tokens and [CLS]
(= no answer), loss `span_ce`. The encoder starts from `init`, as in glue.py:
  init=pretrained:all-minilm-l6-v2          (default) the bundled all-MiniLM-L6-v2 encoder;
  init=pretrained:hf_bert:/path/to/model    any HF BertModel directory (e.g. a released MiniLM);
  init=none                                  random init.
Text is tokenised with the bundled bert-base-uncased WordPiece; a model with another vocabulary
needs --config.data.kwargs.tokenizer=/dir/with/tokenizer.json.
Recipe: the MiniLM papers give no SQuAD fine-tuning hyper-parameters, so the usual BERT SQuAD 2.0
ones
(Devlin et al.): AdamW lr 3e-5 (the low end of 3e-5..5e-5, as in glue.py), wd 0.01, batch 32,
2 epochs, 10% linear warm-up then linear decay, max length 384.
Eval (`span` evaluator): token-level span accuracy (start and end both right), start/end
accuracy and token-overlap F1 against the first gold answer's token span; the official SQuAD
EM/F1 (answer text vs all gold answers) is NOT implemented.

  python -m kd_jax.main --config=configs/minilm/squad.py \
      --config.data.kwargs.data_dir=$HOME/tensorflow_datasets --workdir=runs/minilm_squad2
Paper numbers (microsoft/unilm minilm README, SQuAD2 F1, official metric): MiniLM v1 L6xH384 75.6;
v2 L6xH384
from BERT-base 72.9. Measured here: nothing (SQuAD is not on this machine); `tiny` runs on tfds
mock data.
"""

from kd_jax import config as C

TEACHER = "all-minilm-l6-v2"
TEST_VARIANTS = ()  # needs tfds mock data: tests/test_minilm_squad.py runs `tiny`.
TRAIN_SIZE = 130_319  # TFDS squad/v2.0 train examples


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        init=f"pretrained:{TEACHER}",
        data_dir="",
        epochs=2,
        layers=0,
        hidden=0,
        heads=0,
    )
    c = C.base_config()
    c.data.name = "squad"
    c.data.kwargs = {"data_dir": arg.data_dir, "max_length": 384, "max_query_length": 64}
    c.data.batch_size = c.data.eval_batch_size = 32
    init = "" if arg.init == "none" else arg.init
    preset = init.split(":", 1)[1] if init.startswith("pretrained:") else TEACHER
    arch = {
        k: v
        for k, v in (
            ("num_layers", arg.layers),
            ("hidden_size", arg.hidden),
            ("num_heads", arg.heads),
            ("intermediate_size", 4 * arg.hidden),
        )
        if v
    }
    c.student = C.model("bert_qa", preset=preset, **arch)
    c.student.init = init
    c.objective = {"span": C.term("span_ce")}
    c.evaluator = "span"
    c.optimizer.learning_rate = 3e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.steps = arg.epochs * TRAIN_SIZE // c.data.batch_size
    c.schedule.warmup_steps = c.steps // 10
    c.log_every, c.eval_every = 100, 2000
    if arg.tiny:
        c.data.kwargs = {"data_dir": arg.data_dir, "max_length": 32, "max_query_length": 8}
        c.data.batch_size = c.data.eval_batch_size = 8
        c.steps, c.log_every, c.eval_every, c.progress_bar = 2, 1, 0, False
        c.schedule.warmup_steps = 1
    return c
