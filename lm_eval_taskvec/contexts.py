"""Where the demonstrations S end and the query x begins, read from lm-eval's own task, never guessed.

lm-eval renders a context as ``[system instruction + description] + demonstrations + query turn``. The query
turn is exactly what the task renders for the document (``doc_to_text``, then the target delimiter and
``gen_prefix`` where one is set), so S is what precedes it: the instruction and description belong to S.
Requests from a task lm-eval did not load (direct API calls) fall back to the ``fewshot_delimiter`` model arg.
Contexts rendered through a chat template are split by their turns instead (``chat``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lm_eval_taskvec._autoload import LOADED_TASKS


@dataclass(frozen=True)
class Split:
    demos: str  # S: everything before the query; [S, x'] is demos + x'
    query: str  # x: what the model sees in baseline and hypothesis mode


def rendered_queries(task, doc) -> tuple[str, ...]:
    """The query turn(s) lm-eval appends after the demonstrations of ``doc``, rendered as ``fewshot_context``
    renders them; a multiple-input task (e.g. Winogrande) renders one per choice."""
    if not hasattr(task, "build_qa_turn"):
        raise ValueError(
            f"task {getattr(task, 'task_name', task)!r} is not a YAML (ConfigurableTask) task, so its query cannot "
            "be told from its demonstrations: pass the model arg fewshot_delimiter=<the task's delimiter>"
        )
    gen_prefix = task.doc_to_prefix(doc)
    if task.multiple_input:
        texts, delimiter = task.doc_to_choice(doc), ""
    else:
        texts, delimiter = [task.doc_to_text(doc)], task.config.target_delimiter
    return tuple(
        "".join(m.to_text() for m in task.build_qa_turn(q=q, gen_prefix=gen_prefix, tgt_delim=delimiter, few_delim=""))
        for q in texts
    )


def rendered_answer(task, doc) -> str:
    """What a generation must produce after the query: the text a demonstration of ``doc`` puts after it."""
    query = rendered_queries(task, doc)[0]
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice else None
    turns = task.build_qa_turn(
        q=task.doc_to_text(doc),
        c=choices,
        a=task.doc_to_target(doc),
        gen_prefix=task.doc_to_prefix(doc),
        tgt_delim=task.config.target_delimiter,
        few_delim="",
    )
    demo = "".join(m.to_text() for m in turns)
    if not demo.startswith(query) or len(demo) == len(query):
        raise ValueError(
            f"task {task.config.task!r}: cannot tell the answer from the query in the demonstration {demo!r}"
        )
    return demo[len(query) :]


def split_for_task(
    context: str, queries: tuple[str, ...], num_fewshot: int, task_name: str, need_demos: bool = True
) -> Split:
    """Split ``context`` before the rendered query it ends with; refuse a context without demonstrations
    unless ``need_demos`` is false (a stored θ stands in for them)."""
    if not any(queries):
        raise ValueError(f"task {task_name!r} renders an empty query for this document: nothing to patch θ onto")
    matches = [q for q in queries if q and context.endswith(q)]
    if not matches:
        raise ValueError(
            f"the context of task {task_name!r} does not end with the query the task renders ({queries[0][-60:]!r}). "
            f"Context ends with: {context[-80:]!r}"
        )
    query = max(matches, key=len)
    demos = context[: len(context) - len(query)]
    if need_demos and (num_fewshot < 1 or not demos.strip()):
        raise ValueError(
            f"task {task_name!r} runs {num_fewshot}-shot: its context has no demonstrations to compress into θ "
            f"(a description or system instruction alone is not a demonstration). {shots_fix(task_name)}"
        )
    return Split(demos, query)


def shots_fix(task_name: str) -> str:
    """How to give a task demonstrations: --num_fewshot, unless its config pins ``num_fewshot: 0`` (lm-eval then
    ignores --num_fewshot for it, saying so only in its log)."""
    task = LOADED_TASKS.get(task_name)
    if getattr(task, "taskvec_config_shots", None) != 0:
        return "Run it with --num_fewshot k >= 1."
    where = getattr(task, "taskvec_yaml", None)
    return (
        "Its config pins num_fewshot: 0, for which lm-eval ignores --num_fewshot; to run it k-shot, write a task "
        f"YAML of your own with `include: {where or '<its YAML>'}`, `task: <a new name>` and `num_fewshot: k` "
        "(the task must have a few-shot split or samples) and pass its folder with --include_path."
    )


def split_at_delimiter(context: str, delimiter: str) -> Split:
    """Split at the last ``delimiter``: for requests of tasks lm-eval did not load."""
    demos, found, query = context.rpartition(delimiter)
    if not found or not demos.strip():
        raise ValueError(
            f"context has no demonstrations (no few-shot delimiter {delimiter!r} after a non-empty prefix): "
            f"{context[-80:]!r}. Run the task with --num_fewshot k >= 1, or set the model arg fewshot_delimiter "
            "to the task's delimiter."
        )
    if not query:
        raise ValueError(f"empty query after the last few-shot delimiter {delimiter!r} in {context[-80:]!r}")
    return Split(demos + delimiter, query)


def choose_dummies(pool, own: tuple[str, ...], k: int, seed: int, task: str, demos: str) -> tuple[str, ...]:
    """``k`` dummy queries from ``pool``, never one of the document's ``own`` queries, reproducible.

    The pool is shuffled once per task and demonstrations, and each document takes the first k entries that
    are not its own: documents sharing S therefore share dummies, and so θ.
    """
    order = sorted(set(pool))
    random.Random(f"{seed}|{task}|{demos}").shuffle(order)
    chosen = tuple(q for q in order if q not in own)[:k]
    if len(chosen) < k:
        raise ValueError(
            f"need num_dummy={k} dummy queries but only {len(chosen)} other documents' queries exist "
            f"for task {task!r}: evaluate more documents (raise --limit) or lower num_dummy"
        )
    return chosen
