"""Splitting the context lm-eval sends into demonstrations S and query x, and choosing dummy queries.

lm-eval builds a few-shot context as ``description + demo_1 + delim + ... + demo_k + delim + query``.
The query is what follows the last few-shot delimiter; everything before it (description included) is S.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

AUTO_DELIMITERS = ("\n\n", "\n")  # lm-eval's default few-shot delimiter first, then the paper's


@dataclass(frozen=True)
class SplitContext:
    demos: str  # S: everything before the last delimiter; [S, x'] is demos + delimiter + x'
    delimiter: str
    query: str  # x: what the model sees in baseline and hypothesis mode


def split_context(context: str, delimiter: str | None = None) -> SplitContext:
    """Split at the last ``delimiter``; ``None`` tries lm-eval's "\\n\\n", then "\\n".

    Fails loudly on a context with no demonstrations, since S would be empty and θ meaningless.
    """
    candidates = (delimiter,) if delimiter else AUTO_DELIMITERS
    for delim in candidates:
        demos, found, query = context.rpartition(delim)
        if found and demos.strip():
            return SplitContext(demos, delim, query)
    shown = " or ".join(repr(d) for d in candidates)
    raise ValueError(
        f"context has no demonstrations (no few-shot delimiter {shown} after a non-empty prefix): "
        f"{context[-80:]!r}. Run the task with --num_fewshot k >= 1, or set the model arg "
        "fewshot_delimiter to the task's delimiter."
    )


def choose_dummies(pool, query: str, k: int, seed: int, task: str, demos: str) -> tuple[str, ...]:
    """``k`` dummy queries from ``pool``, never equal to ``query``, reproducible.

    The pool is shuffled once per task and demonstrations, and each document takes the first k
    entries that differ from its own query: documents sharing S therefore share dummies, and so θ.
    """
    order = sorted(set(pool))
    random.Random(f"{seed}|{task}|{demos}").shuffle(order)
    chosen = tuple(q for q in order if q != query)[:k]
    if len(chosen) < k:
        raise ValueError(
            f"need num_dummy={k} dummy queries but only {len(chosen)} other documents' queries exist "
            f"for task {task!r}: evaluate more documents (raise --limit) or lower num_dummy"
        )
    return chosen
