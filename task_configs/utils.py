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


def starts_with_answer(pred: str, answer: str) -> bool:
    """``pred`` begins with ``answer`` and a word boundary follows ("C_LOCAL" starts with "C", "Cat" does not)."""
    return pred.startswith(answer) and (len(pred) == len(answer) or not pred[len(answer)].isalnum())


def paper_match(generation: str, answers: list[str], prefix: bool = False) -> bool:
    """The paper's lenient scoring, which read only the first generated token.

    The prediction starts with an answer followed by a word boundary: what the model says after its
    answer does not count, since the paper never generated it. With ``prefix`` (knowledge tasks) the
    first word may also be a prefix of an answer or the other way round ("New" matches "New Delhi").
    """
    pred = clean(generation)
    if not pred:
        return False
    if any(starts_with_answer(pred, ans) for ans in answers):
        return True
    word = first_word(pred)
    return prefix and any(ans.startswith(word) or word.startswith(ans) for ans in answers)


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
