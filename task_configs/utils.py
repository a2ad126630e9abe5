"""Data loading and scoring for the task-vector tasks (referenced from the YAMLs via !function)."""

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "validation", "test")


def load(tv_task: str, **kwargs) -> datasets.DatasetDict:
    """Read data/<tv_task>.jsonl into train/validation/test.

    The path is built from this file, not the CWD, so the tasks load from anywhere.
    lm-eval passes every model arg and the YAML metadata as kwargs too; they are ignored.
    """
    rows = {split: {"input": [], "answers": []} for split in SPLITS}
    with open(DATA_DIR / f"{tv_task}.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["split"]]["input"].append(row["input"])
            rows[row["split"]]["answers"].append(row["answers"])
    features = datasets.Features(
        {"input": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string"))}
    )
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(cols, features=features) for split, cols in rows.items()}
    )


def clean(generation: str) -> str:
    """The answer part of a generation: up to the first newline, whitespace stripped."""
    return generation.split("\n", 1)[0].strip()


def first_word(text: str) -> str:
    words = clean(text).split()
    return words[0] if words else ""


def exact_match(generation: str, answers: list[str]) -> bool:
    return clean(generation) in answers


def paper_match(generation: str, answers: list[str], prefix: bool = False) -> bool:
    """The paper's lenient scoring: the first word of the prediction equals any answer.

    With `prefix` (knowledge tasks) either may be a prefix of the other, so "New" matches "New Delhi"
    and "Paris," matches "Paris".
    """
    pred = first_word(generation)
    if not pred:
        return False
    if prefix:
        return any(ans.startswith(pred) or pred.startswith(ans) for ans in answers)
    return pred in answers


def process_results(doc: dict, results: list[str]) -> dict:
    return {
        "exact_match": float(exact_match(results[0], doc["answers"])),
        "paper_match": float(paper_match(results[0], doc["answers"])),
    }


def process_results_knowledge(doc: dict, results: list[str]) -> dict:
    return {
        "exact_match": float(exact_match(results[0], doc["answers"])),
        "paper_match": float(paper_match(results[0], doc["answers"], prefix=True)),
    }
