"""``layer=auto``: choose block L per (model, task) on dev documents that are never scored.

- ``dev``: where the dev documents come from (validation split, few-shot pool leave-one-out, or cross-fitted
  halves of the evaluated documents) and the dev prompts lm-eval's task object builds for them;
- ``sweep``: every block scored on those prompts, with baseline and regular on the same prompts;
- ``cache``: choices remembered in memory and on disk, keyed by everything that decides them.

The sweep talks to the model through ``interface.SweepModel``, never through the model class itself.
"""

from __future__ import annotations

import logging

from lm_eval_taskvec.selection import sweep
from lm_eval_taskvec.selection.cache import cache_key
from lm_eval_taskvec.selection.dev import dev_sets, fold_members
from lm_eval_taskvec.selection.interface import SweepModel

log = logging.getLogger("lm_eval.taskvec")

__all__ = ["SweepModel", "layer_of_document", "select_layer"]


def select_layer(lm: SweepModel, task_name: str) -> dict:
    """The chosen layer(s) and dev curves of ``task_name``: from memory, the disk cache, or a sweep."""
    sets = dev_sets(lm.settings, task_name)
    key = cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, task_name, sets)
    remembered = lm.choice_cache.remembered(key)
    if remembered is not None:
        return remembered
    choice = lm.choice_cache.read(key, len(lm.blocks))
    swept = choice is None
    if swept:
        choice = sweep.choose(lm, task_name, sets) | {"source": "sweep"}
    lm.choice_cache.keep(key, choice, swept)
    log_choice(task_name, choice, len(lm.blocks))
    return choice


def layer_of_document(choice: dict, doc_id: int) -> int:
    """The layer an evaluated document is scored at: one per task, or its half's when cross-fitted."""
    if "folds" not in choice:
        return choice["layer"]
    for fold in choice["folds"]:
        if doc_id in fold_members(choice["num_docs"], choice["fold_seed"])[fold["scored_fold"]]:
            return fold["layer"]
    raise RuntimeError(f"document {doc_id} is in neither cross-fitted half of task {choice['task']!r}")


def log_choice(task_name: str, choice: dict, num_blocks: int) -> None:
    """One line per chosen layer; a warning when it does nothing the query alone does not."""
    for part, scope in (
        [(f, f" half {f['scored_fold']}") for f in choice["folds"]] if "folds" in choice else [(choice, "")]
    ):
        line = (
            f"{task_name}{scope}: block {part['layer']} (0-based) of {num_blocks} blocks, dev accuracy "
            f"{part['dev_accuracy'][part['layer']]:.2f} (baseline {part['baseline_accuracy']:.2f}, regular "
            f"{part['regular_accuracy']:.2f}) on {part['num_dev']} prompts from {choice['dev_split']} "
            f"({choice['source']})"
        )
        if part["no_effect"]:
            log.warning(
                "%s. NO EFFECT: no block beats the query alone on the dev prompts (exact McNemar p=%.2f), "
                "so hypothesis mode adds nothing here",
                line,
                part["p_value"],
            )
        else:
            log.info("%s", line)
