"""``layer=auto``: choose block L per (model, task) on dev documents that are never scored.

- ``dev``: where the dev documents come from (validation split, few-shot pool leave-one-out, or cross-fitted
  halves of the evaluated documents) and the dev prompts lm-eval's task object builds for them;
- ``sweep``: every block scored on those prompts, with baseline and regular on the same prompts;
- ``cache``: choices remembered in memory and on disk, keyed by everything that decides them.

The sweep talks to the model through ``interface.SweepModel``, never through the model class itself.
"""

from __future__ import annotations

import logging

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.selection import sweep
from lm_eval_taskvec.selection.cache import cache_key
from lm_eval_taskvec.selection.dev import dev_sets, fold_members
from lm_eval_taskvec.selection.interface import SweepModel
from lm_eval_taskvec.stats import fewest_for_significance

log = logging.getLogger("lm_eval.taskvec")

__all__ = ["SweepModel", "layer_of_document", "select_layer"]


def select_layer(lm: SweepModel, task_name: str) -> dict:
    """The chosen layer(s) and dev curves of ``task_name``: from memory, the disk cache, or a sweep."""
    progress = lm.rank == 0
    task = LOADED_TASKS.get(task_name)
    sets = lm.choice_cache.dev_sets(task_name, task, lm.settings, lambda: dev_sets(lm.settings, task_name, progress))
    key = cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, task_name, sets, progress)
    remembered = lm.choice_cache.remembered(key)
    if remembered is not None:
        return remembered

    def swept() -> dict:
        _announce(lm, task_name, sets)
        return sweep.choose(lm, task_name, sets)

    choice = lm.choice_cache.read_or_sweep(key, len(lm.blocks), swept)
    if lm.rank == 0:  # the other processes of a run read the same choice
        log_choice(task_name, choice, len(lm.blocks))
    return choice


def _announce(lm: SweepModel, task_name: str, sets) -> None:
    """What the sweep is about to cost, before it runs (it can take longer than the evaluation itself)."""
    num_dev, halves = lm.settings.num_dev, len(sets) > 1
    log.info(
        "%s: layer=auto sweeps %d blocks on %d dev prompts%s from %s (model arg num_dev=%d; --limit bounds only "
        "the scored documents, not these)",
        task_name,
        len(lm.blocks),
        num_dev,
        " per half" if halves else "",
        sets[0].split,
        num_dev,
    )
    if num_dev < fewest_for_significance():
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
        best = part["dev_accuracy"][part["layer"]]
        line = (
            f"{task_name}{scope}: block {part['layer']} (0-based) of {num_blocks} blocks, dev accuracy {best:.2f} "
            f"(baseline {part['baseline_accuracy']:.2f}, regular {part['regular_accuracy']:.2f}) on {part['num_dev']} "
            f"prompts from {choice['dev_split']} ({choice['source']})"
        )
        if part["no_effect"]:
            log.warning("%s. NO EFFECT: %s", line, _why_no_effect(part, best))
        else:
            log.info("%s", line)


def _why_no_effect(part: dict, best: float) -> str:
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
