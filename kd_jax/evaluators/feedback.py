"""Tasks B and C of the teacher coach (Wang & Demszky 2023, arXiv:2306.03090), automatic part.

Task B asks a model for highlights and missed opportunities of a transcript segment, task C for
suggestions to elicit student reasoning; both answer one entry per line in the form
`Line number: <n>, Segment: "<words copied from that line>", Reason: <why>` (task C:
`Suggestion: <what>` instead of Reason). The paper's main measures (relevant, faithful,
insightful, actionable, novel) are expert math teachers' judgments, which cannot be reproduced
offline; what can be measured automatically is:

  parse rate     entries in the required form / lines that attempt an entry (a line naming a
                 "line" number or a "segment");
  faithful rate  parsed entries whose quoted segment really occurs on the cited line (after
                 lower-casing, collapsing whitespace and dropping punctuation); the others are
                 split into `wrong_line` (the quote is on another line) and `not_in_transcript`.

Transcript lines are numbered from 1, as `kd_jax.data.ncte.numbered` writes them
("<n>. <speaker>: <text>"). The task prompts (kd_jax's own wording) are data files in
`kd_jax/prompts/teacher_coach_tasks/` (`task_prompt`).
"""

from __future__ import annotations

import json
import os
import re

from kd_jax import prompts
from kd_jax.errors import ConfigValueError

_ENTRY = re.compile(
    r"line(?:\s*(?:number|no\.?|#))?\s*[:#]?\s*(\d+)\s*[,;.]?\s*"
    r"segment\s*:\s*[\"“'](.+?)[\"”']\s*[,;.]?\s*(reason|suggestion)\s*:\s*(.+)$",
    re.I,
)
_ATTEMPT = re.compile(r"\bline(?:\s*number)?\s*[:#]?\s*\d+|\bsegment\s*:", re.I)
_NUMBERED = re.compile(r"^\s*(\d+)\.\s?(.*)$")


def task_prompt(task: str, transcript: str, item: str = "SMQR") -> str:
    """The prompt of task "highlights" (B, about `item`) or "suggestions" (C)."""
    path = os.path.join(prompts.HERE, "teacher_coach_tasks", f"{task}.json")
    if not os.path.isfile(path):
        raise ConfigValueError(
            f"Unknown feedback task '{task}'; use 'highlights' or 'suggestions' (the prompts in "
            f"{os.path.dirname(path)})."
        )
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    it = prompts.load(item)
    fields = {"framework": it["framework"], "name": it["name"], "definition": it["definition"]}
    return prompts.fill(spec["template"], {**fields, "transcript": transcript})


def parse_entries(answer: str) -> tuple[list[dict], int]:
    """([{"line", "segment", "kind" ("reason" | "suggestion"), "text"}], attempted lines)."""
    entries, attempted = [], 0
    for raw in answer.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", raw).strip()
        if not line or not _ATTEMPT.search(line):
            continue
        attempted += 1
        m = _ENTRY.search(line)
        if m:
            entries.append(
                {
                    "line": int(m.group(1)),
                    "segment": m.group(2),
                    "kind": m.group(3).lower(),
                    "text": m.group(4).strip(),
                }
            )
    return entries, attempted


def normalize(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def transcript_lines(transcript: str) -> dict[int, str]:
    """{line number: the line's text without its number} of a numbered transcript."""
    out = {}
    for raw in transcript.splitlines():
        m = _NUMBERED.match(raw)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def faithfulness(entry: dict, lines: dict[int, str]) -> str:
    """ "faithful" | "wrong_line" | "not_in_transcript" (an empty quote is never faithful)."""
    seg = normalize(entry["segment"])
    if not seg:
        return "not_in_transcript"
    padded = f" {seg} "
    if f" {normalize(lines.get(entry['line'], ''))} ".find(padded) >= 0:
        return "faithful"
    if any(f" {normalize(t)} ".find(padded) >= 0 for t in lines.values()):
        return "wrong_line"
    return "not_in_transcript"


def evaluate(answers, transcripts) -> dict:
    """Counts and rates over pairs (answer, numbered transcript)."""
    counts = {"attempted": 0, "parsed": 0, "faithful": 0, "wrong_line": 0, "not_in_transcript": 0}
    for answer, transcript in zip(answers, transcripts, strict=True):
        entries, attempted = parse_entries(answer)
        counts["attempted"] += attempted
        counts["parsed"] += len(entries)
        lines = transcript_lines(transcript)
        for e in entries:
            counts[faithfulness(e, lines)] += 1
    out = dict(counts)
    out["parse_rate"] = counts["parsed"] / counts["attempted"] if counts["attempted"] else None
    out["faithful_rate"] = counts["faithful"] / counts["parsed"] if counts["parsed"] else None
    return out
