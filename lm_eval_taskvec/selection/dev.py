"""Dev documents for ``layer=auto``: never scored, and never among their own demonstrations.

They come from the first source disjoint from the evaluated documents (compared by their rendered queries):
the validation split; else the few-shot pool, leave-one-out; else the evaluated documents themselves,
cross-fitted (two seeded halves, each scored at the layer chosen on the other). Each dev prompt is built by
lm-eval's own task object (its few-shot settings and system instruction) and turned into lm-eval's requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from lm_eval.api.instance import Instance

from lm_eval_taskvec import chat
from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.contexts import rendered_answer, rendered_queries, shots_fix
from lm_eval_taskvec.settings import Settings
from lm_eval_taskvec.theta import few_shot_requests

MIN_DEV_DOCS = 10  # fewer disjoint documents than this: try the next source


@dataclass
class DevExample:
    doc_id: int  # index in the split the document came from
    requests: list[Instance]  # lm-eval's own requests for it: one per choice, or one generation
    gold: int | str  # index of the right choice, or the text a generation must start with
    doc: dict | None = None  # the document itself: function vectors re-render its prompt with shuffled labels


@dataclass
class DevSet:
    split: str  # where the documents came from, for the record
    examples: list[DevExample]
    scored: frozenset[int] | None = None  # cross-fit: the evaluated documents scored at this set's layer


def dev_sets(settings: Settings, task_name: str, progress: bool = False) -> list[DevSet]:
    """One dev set, or two for a cross-fitted task: each a list of dev prompts as lm-eval's requests."""
    task = LOADED_TASKS.get(task_name)
    if task is None:
        raise ValueError(
            f"layer=auto chooses the layer on dev documents of task {task_name!r}, which only runs made through "
            "lm_eval or lm_eval.simple_evaluate provide: pass layer=<block index or fraction> instead"
        )
    if (task.get_config("num_fewshot") or 0) < 1:
        raise ValueError(f"layer=auto needs demonstrations, and task {task_name!r} runs 0-shot. {shots_fix(task_name)}")
    evaluated = list(task.eval_docs)
    scored_queries = {q for doc in evaluated for q in rendered_queries(task, doc)}

    def disjoint(docs):
        return [(i, d) for i, d in enumerate(docs) if not scored_queries & set(rendered_queries(task, d))]

    if task.has_validation_docs() and task.has_test_docs():
        docs = disjoint(task.validation_docs())
        if len(docs) >= MIN_DEV_DOCS:
            return [DevSet(task.config.validation_split, examples(settings, task, progress, docs))]
    fewshot_split = task.fewshot_cfg.split if hasattr(task, "fewshot_cfg") else None
    if fewshot_split:
        docs = disjoint(task.fewshot_docs())
        if len(docs) >= MIN_DEV_DOCS + task.get_config("num_fewshot"):
            return [DevSet(f"{fewshot_split} (leave-one-out)", examples(settings, task, progress, docs))]
    halves = fold_members(len(evaluated), settings.seed)
    if min(map(len, halves)) < MIN_DEV_DOCS // 2:
        raise ValueError(
            f"task {task_name!r} has no dev documents apart from the {len(evaluated)} it scores, too few to "
            "cross-fit: pass layer=<block index or fraction of depth>, e.g. layer=0.6"
        )
    split = task.config.test_split or task.config.validation_split
    return [
        DevSet(
            f"{split} (cross-fit: scored on the other half)",
            examples(settings, task, progress, [(i, evaluated[i]) for i in sorted(halves[1 - fold])]),
            halves[fold],
        )
        for fold in (0, 1)
    ]


@lru_cache(maxsize=64)
def fold_members(num_docs: int, seed: int) -> tuple[frozenset[int], frozenset[int]]:
    """The two seeded halves of a cross-fitted task's evaluated documents, by index."""
    order = list(range(num_docs))
    random.Random(f"{seed}|folds").shuffle(order)
    return frozenset(order[: num_docs // 2]), frozenset(order[num_docs // 2 :])


def examples(settings: Settings, task, progress: bool, docs: list[tuple[int, dict]]) -> list[DevExample]:
    """``num_dev`` dev prompts over ``docs`` (cycled with fresh demonstrations when there are fewer docs)."""
    picked = random.Random(settings.seed).sample(docs, min(settings.num_dev, len(docs)))
    picked = [picked[i % len(picked)] for i in range(settings.num_dev)]
    desc = f"{task.config.task}: rendering layer=auto's dev prompts" if progress else None
    requests = few_shot_requests(task, picked, task.get_config("num_fewshot"), settings.seed, desc)
    return [DevExample(doc_id, reqs, gold(task, doc), doc) for (doc_id, doc), reqs in zip(picked, requests)]


def gold(task, doc) -> int | str:
    """What a dev document is right with: the index of its right choice, or the text its answer starts with
    (under a chat template, the text of the assistant's answer turn after the generation prompt).
    The index is read as lm-eval's ``process_results`` reads it: a multiple-input task (e.g. Winogrande, whose
    choices are the contexts and whose target is the continuation they share) gives it as ``doc_to_text``."""
    if task.get_config("output_type") == "generate_until":
        return chat.answer(task, doc) if chat.uses_chat(task) else rendered_answer(task, doc)
    target, choices = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc), task.doc_to_choice(doc)
    if isinstance(target, int):
        return target
    if target not in choices:
        raise ValueError(
            f"task {task.config.task!r}: layer=auto needs each dev document's right choice, but its target "
            f"{target!r} is none of its choices {choices!r}: pass layer=<block index or fraction of depth>"
        )
    return choices.index(target)
