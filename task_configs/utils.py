"""Data loading and scoring for the task-vector tasks (referenced from the YAMLs via !function)."""

import json
from collections.abc import Collection
from functools import cache
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "validation", "test")


def load(tv_task: str, **kwargs) -> datasets.DatasetDict:
    """Read data/<tv_task>.jsonl into train/validation/test.

    The path is built from this file, not the CWD, so the tasks load from anywhere. Each row also
    carries its task's name, so that scoring can look up the task's whole answer set.
    lm-eval passes every model arg and the YAML metadata as kwargs too; they are ignored.
    """
    rows = {split: {"input": [], "answers": [], "task": []} for split in SPLITS}
    for row in _rows(tv_task):
        rows[row["split"]]["input"].append(row["input"])
        rows[row["split"]]["answers"].append(row["answers"])
        rows[row["split"]]["task"].append(tv_task)
    features = datasets.Features(
        {"input": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string")),
         "task": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(cols, features=features) for split, cols in rows.items()}
    )


def _rows(tv_task: str) -> list[dict]:
    with open(DATA_DIR / f"{tv_task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@cache
def answer_set(tv_task: str) -> frozenset[str]:
    """Every acceptable answer of every document of the task, in all splits."""
    return frozenset(answer for row in _rows(tv_task) for answer in row["answers"])


def clean(generation: str) -> str:
    """The answer part of a generation: up to the first newline, whitespace stripped."""
    return generation.split("\n", 1)[0].strip()


def first_word(text: str) -> str:
    words = clean(text).split()
    return words[0] if words else ""


def exact_match(generation: str, answers: list[str]) -> bool:
    return clean(generation) in answers


def starts_with_answer(pred: str, answer: str) -> bool:
    """``pred`` begins with ``answer`` and a word boundary follows ("C_LOCAL" starts with "C", "Cat" does not)."""
    return pred.startswith(answer) and (len(pred) == len(answer) or not pred[len(answer)].isalnum())


def paper_match(generation: str, answers: list[str], answer_set: Collection[str] | None = None) -> bool:
    """The paper's lenient scoring, which read only the first generated token.

    The prediction starts with an answer followed by a word boundary: what the model says after its
    answer does not count, since the paper never generated it. Given the task's ``answer_set``
    (knowledge tasks), the first word may also extend an answer ("Parisian" for "Paris") or cut one
    ("New" for "New Delhi"), but a cut counts only when every answer of the whole set that starts with
    it is acceptable here: "A" is not "Asia" when "Africa" is an answer too.
    """
    pred = clean(generation)
    if not pred:
        return False
    if any(starts_with_answer(pred, ans) for ans in answers):
        return True
    if answer_set is None:
        return False
    word = first_word(pred)
    if any(word.startswith(ans) for ans in answers):
        return True
    cut = {ans for ans in set(answer_set) | set(answers) if ans.startswith(word)}
    return bool(cut) and cut <= set(answers)


def process_results(doc: dict, results: list[str]) -> dict:
    return {
        "exact_match": float(exact_match(results[0], doc["answers"])),
        "paper_match": float(paper_match(results[0], doc["answers"])),
    }


def process_results_knowledge(doc: dict, results: list[str]) -> dict:
    return {
        "exact_match": float(exact_match(results[0], doc["answers"])),
        "paper_match": float(paper_match(results[0], doc["answers"], answer_set(doc["task"]))),
    }
