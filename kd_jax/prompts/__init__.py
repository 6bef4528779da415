"""Prompt templates as data files, their rendering, and strict parsers of the answers.

`teacher_coach/<item>.json` (kd_jax's own wording of the items described by Wang & Demszky 2023,
arXiv:2306.03090): the conversational-uptake item (0-2) and the paper's seven items, CLASS
positive climate (CLPC), behavior management (CLBM), instructional dialogue (CLINSTD), scale
1-7, and MQI explanations (EXPL), remediation (REMED), imprecision (LANGIMP), student
questioning and reasoning (SMQR), scale 1-3. Each holds three variants: "DA" (direct answer, the
rating only), "RA" (reason step by step, then a "Rating:" line) and "DA+" (direct answer with
the rubric's description of each rating). Placeholders: {student}, {teacher} (exchange items) or
{transcript} (segment items), and the item's own fields. A template's identity is the SHA-256
of its text with the item's fields filled in (`template_hash`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

from kd_jax.errors import ConfigValueError, CorruptFileError, corrupt_file

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("DA", "DA+", "RA")
# The fields of an item file (teacher_coach/<item>.json).
FIELDS = ("item", "framework", "name", "input", "scale", "definition", "levels", "templates")


def template_dir(family: str = "teacher_coach") -> str:
    return os.path.join(HERE, family)


def items(family: str = "teacher_coach") -> tuple[str, ...]:
    return tuple(sorted(f[:-5] for f in os.listdir(template_dir(family)) if f.endswith(".json")))


@functools.lru_cache(maxsize=64)
def load(item: str, family: str = "teacher_coach") -> dict:
    path = os.path.join(template_dir(family), f"{item}.json")
    if not os.path.isfile(path):
        raise ConfigValueError(f"Unknown prompt item '{item}'; known: {list(items(family))}.")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt_file(path, "prompt template", e) from e
    missing = sorted(set(FIELDS) - set(spec)) if isinstance(spec, dict) else list(FIELDS)
    if family == "teacher_coach" and missing:
        raise CorruptFileError(
            f"Prompt template {path} lacks fields {missing}; each item file holds {list(FIELDS)} "
            "(see the other files in its folder)."
        )
    return spec


def scale(item: str) -> tuple[int, ...]:
    lo, hi = load(item)["scale"]
    return tuple(range(lo, hi + 1))


def template(item: str, variant: str) -> str:
    """The variant's text with the item's own fields filled in; input placeholders remain."""
    spec = load(item)
    if variant not in spec["templates"]:
        raise ConfigValueError(
            f"Unknown prompt variant '{variant}' for item '{item}'; use one of {VARIANTS}."
        )
    lo, hi = spec["scale"]
    levels = "\n".join(f"{k}: {v}" for k, v in spec["levels"].items())
    fields = dict(
        framework=spec["framework"],
        name=spec["name"],
        definition=spec["definition"],
        low=str(lo),
        high=str(hi),
        levels=levels,
    )
    return _fill(spec["templates"][variant], fields)


def template_hash(item: str, variant: str) -> str:
    return hashlib.sha256(template(item, variant).encode("utf-8")).hexdigest()[:16]


def placeholders(item: str, variant: str) -> set[str]:
    """The input placeholders ({student}, {teacher} or {transcript}) the variant's text leaves."""
    return set(re.findall(r"\{(\w+)\}", template(item, variant)))


def check_inputs(item: str, variant: str, inputs) -> None:
    """A ConfigValueError naming the template file unless the variant's placeholders are exactly
    `inputs` (what the scored data gives): callable before any stage runs."""
    needed = placeholders(item, variant)
    if needed != set(inputs):
        path = os.path.join(template_dir(), f"{item}.json")
        raise ConfigValueError(
            f"Prompt template {path} variant '{variant}' needs inputs {sorted(needed)}, but the "
            f"data gives {sorted(inputs)}: score item '{item}' on data with those fields, or fix "
            "the template's placeholders."
        )


def render(item: str, variant: str, **inputs: str) -> str:
    """The prompt for one input: {student, teacher} or {transcript}."""
    check_inputs(item, variant, inputs)
    return _fill(template(item, variant), inputs)


def fill(text: str, fields: dict) -> str:
    """Replaces {name} placeholders named in `fields`; other braces are left alone."""
    return _fill(text, fields)


def _fill(text: str, fields: dict) -> str:
    # Plain replacement of known names only: braces elsewhere in the text (or in a transcript)
    # are left alone, unlike str.format.
    return re.sub(r"\{(\w+)\}", lambda m: str(fields.get(m.group(1), m.group(0))), text)


# A direct answer: the number alone, optionally "Rating:"/"Score:" before it, "/N" or "out of N"
# after it, and a final period. Anything else is unparsable (reported, never dropped silently).
_DIRECT = re.compile(
    r"^\s*(?:(?:rating|score)\s*[:=]?\s*)?(-?\d+)\s*(?:(?:/|out of)\s*\d+)?\s*\.?\s*$", re.I
)
_RATING_LINE = re.compile(r"rating\s*[:=]\s*\**\s*(-?\d+)\b", re.I)


def parse(answer: str, variant: str, allowed) -> tuple[int | None, str]:
    """(score, "ok") or (None, reason). DA / DA+: the whole answer must be the number (see
    `_DIRECT`); RA: the last "Rating: N" in the answer. Reasons: "empty", "no rating",
    "not a bare number", "out of scale"."""
    text = answer.strip()
    if not text:
        return None, "empty"
    if variant == "RA":
        found = _RATING_LINE.findall(text)
        if not found:
            return None, "no rating"
        value = int(found[-1])
    else:
        m = _DIRECT.match(text)
        if not m:
            return None, "not a bare number"
        value = int(m.group(1))
    if value not in tuple(allowed):
        return None, "out of scale"
    return value, "ok"


def rating_prefix(answer: str) -> str:
    """For RA's probability readout: the answer up to and including its last "Rating:" (then a
    space), or the whole answer plus "\\nRating: " when it has none."""
    idx = [m.start() for m in re.finditer(r"rating\s*[:=]", answer, flags=re.I)]
    if not idx:
        return answer.rstrip() + "\nRating: "
    head = answer[idx[-1] :]
    colon = re.match(r"rating\s*[:=]", head, flags=re.I).end()
    return answer[: idx[-1] + colon] + " "
