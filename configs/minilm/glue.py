r"""Fine-tuning a (distilled) BERT encoder on GLUE SST-2 or MNLI (downstream of MiniLM).

Data: the user's prepared TFDS `glue/sst2` or `glue/mnli` (array_record), read with
`tfds.data_source` (no TensorFlow, nothing downloaded); eval on SST-2 validation / MNLI
validation_matched. A missing dataset is an error naming the expected
`<data_dir>/glue/<task>/2.0.0/` layout. Model: `bert_classifier` = BERT encoder + tanh pooler on
[CLS] + dropout + linear head, CE loss, accuracy eval. The encoder starts from `init`:
  init=pretrained:all-minilm-l6-v2          (default) the bundled all-MiniLM-L6-v2 encoder;
  init=pretrained:hf_bert:/path/to/model    any HF BertModel directory (e.g. a released MiniLM);
  init=none                                  random init (the "no pre-training" baseline).
`layers=..,hidden=..,heads=..` set the architecture when it is not the preset's (e.g. a random
3 x 384). Recipe: the usual BERT fine-tuning (Devlin et al.), not from the MiniLM papers: AdamW lr
3e-5,
wd 0.01, batch 32, max length 128, 10% linear warm-up then linear decay, 3 epochs.
Not supported yet: starting from a kd_jax distillation run's checkpoint directory (export it as
HF safetensors first). SQuAD 2.0: configs/minilm/squad.py.

  python -m kd_jax.main --config=configs/minilm/glue.py:task=mnli \
      --config.data.kwargs.data_dir=$HOME/tensorflow_datasets --workdir=runs/minilm_mnli
Paper numbers (microsoft/unilm minilm README, MiniLM v1 L6xH384 from UniLMv2-base): MNLI-m 83.3,
SST-2 91.5.
Measured here: nothing (GLUE is not available on this machine); `tiny` runs on tfds mock data.
"""

from kd_jax import config as C
from kd_jax.data.text import GLUE_TASKS

TEACHER = "all-minilm-l6-v2"
TEST_VARIANTS = ()  # needs tfds mock data: tests/test_minilm_finetune.py runs `tiny`.
# Training examples per task (TFDS glue 2.0.0), for 3-epoch step counts.
TRAIN_SIZE = {"sst2": 67_349, "mnli": 392_702}


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        task="sst2",
        init=f"pretrained:{TEACHER}",
        data_dir="",
        layers=0,
        hidden=0,
        heads=0,
    )
    if arg.task not in GLUE_TASKS:
        raise ValueError(f"Unknown task '{arg.task}'; use one of {sorted(GLUE_TASKS)}.")
    c = C.base_config()
    c.data.name = "glue"
    c.data.kwargs = {"task": arg.task, "data_dir": arg.data_dir, "max_length": 128}
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
    c.student = C.model(
        "bert_classifier", preset=preset, num_classes=GLUE_TASKS[arg.task][3], **arch
    )
    c.student.init = init
    c.objective = {"ce": C.term("ce")}
    c.evaluator = "classification"
    c.optimizer.learning_rate = 3e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "warmup_linear"
    c.steps = 3 * TRAIN_SIZE[arg.task] // c.data.batch_size
    c.schedule.warmup_steps = c.steps // 10
    c.log_every, c.eval_every = 100, 2000
    if arg.tiny:
        c.data.kwargs = {"task": arg.task, "data_dir": arg.data_dir, "max_length": 16}
        c.data.batch_size = c.data.eval_batch_size = 8
        c.steps, c.log_every, c.eval_every, c.progress_bar = 2, 1, 0, False
        c.schedule.warmup_steps = 1
    return c
