"""Tiny lm-eval tasks built in memory from a config dict, so tests can try any prompt format quickly."""

from __future__ import annotations

import datasets
import lm_eval.tasks  # noqa: F401  (the start-up hook wraps Task.build_all_requests once this is imported)
from lm_eval.api.task import ConfigurableTask

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letter_rows(n: int = 24, offset: int = 0) -> list[dict]:
    """Rows {"input": "b", "answers": ["B"]}, distinct inputs of one or two letters."""
    inputs = [a for a in LETTERS] + [a + b for a in LETTERS for b in LETTERS[:4]]
    return [{"input": x, "answers": [x.upper()]} for x in inputs[offset : offset + n]]


def make_task(name: str = "tiny", splits: dict[str, list[dict]] | None = None, **config) -> ConfigurableTask:
    """A generate_until task over ``splits`` (default: disjoint train/validation/test letter rows)."""
    splits = splits or {"train": letter_rows(24), "validation": letter_rows(24, 24), "test": letter_rows(24, 48)}
    features = datasets.Features(
        {"input": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string"))}
    )
    dataset = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows, features=features) for split, rows in splits.items()}
    )
    base = {
        "task": name,
        "custom_dataset": lambda **_: dataset,
        "training_split": "train" if "train" in splits else None,
        "validation_split": "validation" if "validation" in splits else None,
        "test_split": "test" if "test" in splits else None,
        "fewshot_split": "train" if "train" in splits else None,
        "num_fewshot": 3,
        "output_type": "generate_until",
        "doc_to_text": "example:{{input}}->",
        "doc_to_target": "{{answers[0]}}",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 4},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    return ConfigurableTask(config=base | config)


def requests_of(task: ConfigurableTask, limit: int | None = None, **kwargs) -> list:
    """lm-eval's own requests for the task, built as the evaluator builds them (the hook records the task)."""
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1, **kwargs)
    return list(task.instances)
