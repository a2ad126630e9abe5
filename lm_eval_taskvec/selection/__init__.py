"""``layer=auto``: choose block L per (model, task) on dev documents that are never scored.

- ``dev``: where the dev documents come from (validation split, few-shot pool leave-one-out, or cross-fitted
  halves of the evaluated documents) and the dev prompts lm-eval's task object builds for them;
- ``criterion``: what a block is scored by (choice accuracy, the first token, or the reference's log-likelihood);
- ``function_vector``: a task's function vector (attention heads ranked on shuffled-label dev prompts);
- ``sweep``: every block scored on those prompts, with baseline and regular on the same prompts;
- ``cache``: choices remembered in memory and on disk, keyed by everything that decides them.

The sweep talks to the model through ``interface.SweepModel``, never through the model class itself.
"""

from __future__ import annotations

import logging

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.selection import function_vector, sweep
from lm_eval_taskvec.selection.cache import cache_key
from lm_eval_taskvec.selection.criterion import DEFAULTS, REFERENCE_LOGLIKELIHOOD, criterion_for, why
from lm_eval_taskvec.selection.dev import dev_sets, fold_members
from lm_eval_taskvec.selection.interface import SweepModel
from lm_eval_taskvec.stats import fewest_for_significance
from lm_eval_taskvec.theta import ThetaKey

log = logging.getLogger("lm_eval.taskvec")

__all__ = ["SweepModel", "function_vector_of", "layer_of_document", "select_layer", "task_mean_key"]


def select_layer(lm: SweepModel, task_name: str) -> dict:
    """The chosen layer(s) and dev curves of ``task_name``: from memory, the disk cache, or a sweep."""
    progress = lm.rank == 0
    task = LOADED_TASKS.get(task_name)
    sets = lm.choice_cache.dev_sets(task_name, task, lm.settings, lambda: dev_sets(lm.settings, task_name, progress))
    criterion = criterion_for(task_name, [ex.gold for ex in sets[0].examples])
    key = cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, task_name, sets, criterion, progress)
    remembered = lm.choice_cache.remembered(key)
    if remembered is not None:
        return remembered

    if lm.settings.vector == "function_vector":  # the sweep patches it; made here, outside the cache's lock
        function_vector.ensure(lm, task_name, sets)

    def swept() -> dict:
        _announce(lm, task_name, sets, criterion)
        return sweep.choose(lm, task_name, sets, criterion)

    choice = lm.choice_cache.read_or_sweep(key, len(lm.blocks), swept)
    choice.setdefault("criterion", criterion)  # written before choices recorded it: the old default
    if lm.rank == 0:  # the other processes of a run read the same choice
        log_choice(task_name, choice, len(lm.blocks))
        _warn_if_unmeetable(lm, task_name, choice)
    return choice


def task_mean_key(lm: SweepModel, task_name: str) -> ThetaKey:
    """vector=task_mean: the key of ``task_name``'s one θ, the mean of θ over its dev prompts (the sets
    layer=auto sweeps on, both halves of a cross-fitted task: θ's prompts hold no answer of a scored document)."""
    sets = _task_dev_sets(lm, task_name, "vector=task_mean averages θ over")
    return sweep.task_mean_of(lm, [r for dev in sets for ex in dev.examples for r in ex.requests])


def function_vector_of(lm: SweepModel, task_name: str) -> tuple[ThetaKey, dict]:
    """vector=function_vector: the key of ``task_name``'s function vector (put at every block) and its record,
    from the same dev prompts as task_mean's (see ``selection.function_vector``)."""
    sets = _task_dev_sets(lm, task_name, "vector=function_vector ranks attention heads on")
    return function_vector.ensure(lm, task_name, sets)


def _task_dev_sets(lm: SweepModel, task_name: str, what: str):
    if task_name not in LOADED_TASKS:
        raise ValueError(
            f"{what} dev prompts of task {task_name!r}, which only runs made through "
            "lm_eval or lm_eval.simple_evaluate provide: use vector=prompt (method=hendel) for this task"
        )
    task = LOADED_TASKS[task_name]
    return lm.choice_cache.dev_sets(
        task_name, task, lm.settings, lambda: dev_sets(lm.settings, task_name, lm.rank == 0)
    )


def _announce(lm: SweepModel, task_name: str, sets, criterion: str) -> None:
    """What the sweep is about to cost, before it runs (it can take longer than the evaluation itself)."""
    num_dev, halves = lm.settings.num_dev, len(sets) > 1
    log.info(
        "%s: layer=auto sweeps %d blocks on %d dev prompts%s from %s (model arg num_dev=%d; --limit bounds only "
        "the scored documents, not these), scoring each block by %s (%s)",
        task_name,
        len(lm.blocks),
        num_dev,
        " per half" if halves else "",
        sets[0].split,
        num_dev,
        criterion,
        why(criterion),
    )
    if num_dev < fewest_for_significance() and criterion != REFERENCE_LOGLIKELIHOOD:
        lm.warn_once(
            f"num_dev={num_dev}: with fewer than {fewest_for_significance()} dev prompts the exact McNemar test of "
            "layer=auto can never reach p < 0.05, so every task is reported as NO EFFECT whatever the sweep finds; "
            "use num_dev >= 6 (the paper's 50) for the test to mean something"
        )


def layer_of_document(choice: dict, doc_id: int) -> int:
    """The layer an evaluated document is scored at: one per task, or its half's when cross-fitted."""
    if "folds" not in choice:
        return choice["layer"]
    for fold in choice["folds"]:
        if doc_id in fold_members(choice["num_docs"], choice["fold_seed"])[fold["scored_fold"]]:
            return fold["layer"]
    raise RuntimeError(f"document {doc_id} is in neither cross-fitted half of task {choice['task']!r}")


def log_choice(task_name: str, choice: dict, num_blocks: int) -> None:
    """One line per chosen layer, as the choice records it (a cross-fitted task: each half, then both pooled);
    a warning for each that does not beat the query alone, saying what was tested."""
    parts = [(choice, "")]
    if "folds" in choice:
        parts = [(f, f" half {f['scored_fold']}") for f in choice["folds"]]
        parts.append((choice, " (both halves pooled, for the record: each half is scored at the other's block)"))
    for part, scope in parts:
        if part.get("criterion") == REFERENCE_LOGLIKELIHOOD:
            best = part["dev_score"][part["layer"]]
            scores = (
                f"dev log-likelihood per reference token {best:.3f} (baseline {part['baseline_score']:.3f}, regular "
                f"{part['regular_score']:.3f}; first-token accuracy {part['dev_accuracy'][part['layer']]:.2f}, "
                f"baseline {part['baseline_accuracy']:.2f}, regular {part['regular_accuracy']:.2f})"
            )
        else:
            best = part["dev_accuracy"][part["layer"]]
            scores = (
                f"dev accuracy {best:.2f} (baseline {part['baseline_accuracy']:.2f}, regular "
                f"{part['regular_accuracy']:.2f})"
            )
        line = (
            f"{task_name}{scope}: block {part['layer']} (0-based) of {num_blocks} blocks, {scores} on "
            f"{part['num_dev']} prompts from {choice['dev_split']} ({choice['source']})"
        )
        if part["no_effect"]:
            log.warning("%s. NO EFFECT: %s", line, _why_no_effect(part, best))
        else:
            log.info("%s", line)


NEAR_ZERO = 0.05  # regular ICL's dev accuracy at or below this: the criterion cannot tell blocks apart


def _warn_if_unmeetable(lm: SweepModel, task_name: str, choice: dict) -> None:
    """Say so when the criterion cannot be met even with the demonstrations in the prompt: then the sweep's
    choice says nothing about where the task vector is."""
    criterion = choice.get("criterion")
    if criterion == REFERENCE_LOGLIKELIHOOD:
        if choice["regular_score"] <= choice["baseline_score"]:
            lm.warn_once(
                f"{task_name}: on the dev prompts the demonstrations do not make the references likelier than the "
                f"query alone (log-likelihood per token: regular {choice['regular_score']:.3f}, baseline "
                f"{choice['baseline_score']:.3f}), so layer=auto has no task vector to find and its choice (layer "
                f"{choice['layer']}) is a guess: pass layer=<block index or fraction of depth>"
            )
        return
    if criterion in DEFAULTS and choice["regular_accuracy"] <= NEAR_ZERO:
        lm.warn_once(
            f"{task_name}: regular ICL itself scores {choice['regular_accuracy']:.2f} on the dev prompts by "
            f"{criterion} ({why(criterion)}), so this criterion cannot tell the blocks apart and layer=auto's choice "
            f"(layer {choice['layer']}) is a guess (the demonstrations' answers may not begin as the references do): "
            "pass layer=<block index or fraction of depth>"
        )


def _why_no_effect(part: dict, best: float) -> str:
    if part.get("criterion") == REFERENCE_LOGLIKELIHOOD:
        if best <= part["baseline_score"]:
            return "no block makes the references likelier than the query alone, so hypothesis mode adds nothing here"
        return (
            f"the best block's gain in log-likelihood over the query alone is not significant at p < 0.05 (paired "
            f"bootstrap p={part['p_value']:.2f} on {part['num_dev']} dev prompts)"
        )
    if best <= part["baseline_accuracy"]:
        return "no block beats the query alone on the dev prompts, so hypothesis mode adds nothing here"
    fewest = fewest_for_significance()
    why = (
        f"too few to tell: p < 0.05 needs at least {fewest} dev prompts"
        if part["num_dev"] < fewest
        else "the gain may be chance"
    )
    return (
        f"the best block's gain over the query alone is not significant at p < 0.05 (exact McNemar p="
        f"{part['p_value']:.2f} on {part['num_dev']} dev prompts: {why})"
    )
