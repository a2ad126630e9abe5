"""Refusals before anything runs: every task of an lm-eval run is checked at the model's first call.

lm-eval builds every task's requests, then calls the model once per request type (all tasks' likelihood
requests, then all generations). A task the patched modes cannot run would otherwise fail only when its request
type comes up, after hours of the others; so the first call of a run plans every task's requests (S and x,
query lengths, the dev documents ``layer=auto`` needs) and refuses the run at once, naming every task that
cannot run and why. Outside lm-eval's ``evaluate`` (direct API calls) the requests themselves are planned as
they come, which refuses them just as well.

It also prints, for ``--write_out``, what the patched modes actually run: lm-eval prints the few-shot prompt
it built, but hypothesis and baseline run the query alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from lm_eval_taskvec._autoload import CURRENT_RUN
from lm_eval_taskvec.selection.dev import dev_sets
from lm_eval_taskvec.settings import AUTO

log = logging.getLogger("lm_eval.taskvec")


def rolling_refusal(mode: str) -> str:
    return (
        f"mode={mode} needs few-shot demonstrations; loglikelihood_rolling (perplexity) tasks have none: run them "
        "with mode=regular"
    )


def beam_refusal(request) -> str | None:
    kwargs = request.args[1] or {}
    if max(int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1)) > 1:
        return (
            f"task {request.task_name!r} asks for num_beams/num_return_sequences > 1: hypothesis mode patches one θ "
            "per prompt row; use greedy or sampled decoding"
        )
    return None


def patched_mode(lm) -> str | None:
    """The patched mode whose refusals apply: the model's, or in a regular run that prepares the modes to come
    (``taskvec compare``), the first patched one of them, so that its refusals come before the regular run."""
    if lm.mode != "regular":
        return lm.mode
    return next((m for m in ("hypothesis", "baseline") if m in (getattr(lm.shared, "modes", None) or ())), None)


def check_run(lm, requests) -> None:
    """Once per lm-eval run and model: refuse the run if any of its tasks cannot run in its patched mode
    (naming them all), then print what ``--write_out`` asked for. A no-op outside a run and in a plain regular
    run."""
    tasks, mode = CURRENT_RUN.get("tasks"), patched_mode(lm)
    if mode is None or not tasks or id(lm) in CURRENT_RUN["checked"]:
        return
    CURRENT_RUN["checked"].add(id(lm))
    by_task = defaultdict(list)
    for name, task in tasks.items():
        by_task[name] = list(getattr(task, "instances", None) or [])
    for request in requests:  # requests of a task the run did not list (a hand-built Instance): checked too
        if request.task_name not in tasks:
            by_task[request.task_name].append(request)
    problems = {}
    for name, task_requests in by_task.items():
        if task_requests and (problem := task_problem(lm, name, task_requests, mode)):
            problems[name] = problem
    if problems:
        listed = "\n".join(f"  - {name}: {problem}" for name, problem in sorted(problems.items()))
        raise ValueError(
            f"hf-taskvec mode={mode} cannot run {len(problems)} of the {len(by_task)} tasks of this run, so none "
            f"was run:\n{listed}\nLeave those out of --tasks (or run them with mode=regular); the others can run."
        )
    for name in sorted(CURRENT_RUN.get("written_out", ())):
        if by_task.get(name) and lm.mode != "regular":
            write_out(lm, name, by_task[name])


def task_problem(lm, task_name: str, requests, mode: str) -> str | None:
    """Why ``lm`` cannot run this task's requests in ``mode``, or None."""
    if any(r.request_type == "loglikelihood_rolling" for r in requests):
        return rolling_refusal(mode)
    try:
        lm.planner.plan(requests, with_theta=False)  # S and x of every request, and the query lengths
        if mode == "hypothesis":
            for request in requests:
                if request.request_type == "generate_until" and (problem := beam_refusal(request)):
                    return problem
            if (lm.settings.layer == AUTO or lm.settings.vector != "prompt") and lm.planner.stored is None:
                dev_sets(lm.settings, task_name)  # the dev documents layer=auto (and a task's one θ) draw on
    except ValueError as err:
        return str(err)
    return None


def write_out(lm, task_name: str, requests) -> None:
    """The prompt the patched mode runs for the document lm-eval's ``--write_out`` printed (its document 0)."""
    first = [r for r in requests if r.doc_id is not None and r.doc_id < 1][:1]
    if not first:
        return
    (plan,) = lm.planner.plan(first, with_theta=False)
    how = (
        "the query alone, with block L's output at its last token replaced by θ (the mean over dummy queries x' of "
        "block L's output at the last token of [S, x'], S being the demonstrations of the prompt above)"
        if lm.mode == "hypothesis"
        else "the query alone (no demonstrations, description or system instruction)"
    )
    log.info(
        "Task: %s; document %s; hf-taskvec mode=%s runs %s; the prompt it runs (starting on next line):\n%s\n"
        "(end of prompt on previous line)",
        task_name,
        first[0].doc_id,
        lm.mode,
        how,
        plan.query,
    )
