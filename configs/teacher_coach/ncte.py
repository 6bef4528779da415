r"""Teacher coach at paper scale (Wang & Demszky 2023, arXiv:2306.03090, task A): an LLM scores
NCTE transcript segments on the seven CLASS / MQI items, each with the three prompt variants DA,
RA and DA+ (21 prompts per segment), against the human ratings.

The transcripts and the rating files need the NCTE data agreement and are not shipped; give the
paths to your copies (formats in `kd_jax/data/ncte.py`; a missing or malformed file is an error
naming the expected layout):
  transcripts=.../single_utterances.csv   (OBSID, turn_idx, speaker, text[, cleaned_text])
  class_ratings=.../class_data.csv        (OBSID, CHAPNUM, RATERID, CLPC, CLBM, CLINSTD, ...)
  mqi_ratings=.../mqi_data.csv            (OBSID, CHAPNUM, RATERID, EXPL, REMED, LANGIMP, SMQR)
Segments: each observation's utterances cut into as many equal parts as it has rated chapters.
Agreement: CLASS vs rater-averaged segment scores, MQI vs each rater's row (the paper's
conventions), Spearman with observation-cluster bootstrap intervals, kappa, parse rates,
distribution plot.

  D=/data/ncte
  python -m kd_jax.main --workdir=runs/coach_ncte --config=configs/teacher_coach/ncte.py:\
  transcripts=$D/single_utterances.csv,class_ratings=$D/class_data.csv,mqi_ratings=$D/mqi_data.csv

Teacher: SmolLM2-135M-Instruct by default; any llama/qwen2 GGUF with `gguf=/path/model.gguf`.
`tiny`: the hand-made format fixtures in tests/fixtures/ncte and a random tiny decoder.
"""

import os

from kd_jax import config as C
from kd_jax.data.ncte import CLASS_ITEMS, MQI_ITEMS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ncte")
SMOLLM2 = "smollm2-135m-instruct"


def get_config(arg=None):
    arg = C.parse_arg(
        arg,
        tiny=False,
        transcripts="data/ncte/single_utterances.csv",
        class_ratings="data/ncte/class_data.csv",
        mqi_ratings="data/ncte/mqi_data.csv",
        gguf="",
        limit=0,  # segments per framework (0 = all)
        max_words=600,  # transcript words per segment in the prompt
    )
    c = C.base_config()
    if arg.gguf:
        teacher = C.model("llama", preset=f"gguf:{arg.gguf}")
        teacher.init = f"pretrained:gguf:{arg.gguf}"
    else:
        teacher = C.model("llama", preset=SMOLLM2)
        teacher.init = f"pretrained:{SMOLLM2}"
    score = dict(
        source="ncte",
        splits=("all",),
        generate_splits=("all",),
        items=CLASS_ITEMS + MQI_ITEMS,
        variants=("DA", "DA+", "RA"),
        transcripts=arg.transcripts,
        class_ratings=arg.class_ratings,
        mqi_ratings=arg.mqi_ratings,
        limit=arg.limit,
        max_words=arg.max_words,
        max_new_tokens=6,
        max_new_tokens_ra=128,
        batch_size=8,
        bootstrap=1000,
    )
    if arg.tiny:
        teacher = C.model(
            "llama", vocab_size=49152, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1
        )
        teacher.init = "random:0"
        score.update(
            transcripts=os.path.join(FIXTURES, "single_utterances.csv"),
            class_ratings=os.path.join(FIXTURES, "class_data.csv"),
            mqi_ratings=os.path.join(FIXTURES, "mqi_data.csv"),
            max_new_tokens=3,
            max_new_tokens_ra=4,
            batch_size=4,
            bootstrap=10,
        )
    c.stages = {"score": {"kind": "score", "teacher": teacher, "score": score}}
    c.stage_order = ("score",)
    c.progress_bar = False
    return c


TEST_VARIANTS = ()  # tests/test_teacher_coach.py runs `tiny` (and checks its records).
