"""What one of HFLM's callbacks hands to the next within one lm-eval call, and what a run leaves for the next mode.

HFLM calls, for generation tasks::

    generate_until(requests)              # sorts and batches the requests by context string
      -> _detect_batch_size()             # batch_size=auto only, before the first batch
      -> tok_batch_encode(contexts)       # one batch: context strings -> left-padded token ids
      -> _model_generate(ids, ...)        # the same batch: HF generate (the prompt's pass, then decode steps)

and for likelihood tasks (loglikelihood, multiple choice)::

    loglikelihood(requests) -> _loglikelihood_tokens(encoded)   # sorts and batches the (context, continuation) rows
      -> _model_call(ids)                                        # one right-padded batch, no attention mask

hf-taskvec rewrites each context into its plan's query before HFLM tokenizes it, so the later callbacks see
only token ids. ``Handoff`` carries what they need to patch the right rows: in generation, the plans by
context string (for ``tok_batch_encode``) and the plans of the batch it just built (for ``_model_generate``);
in likelihood, each row's plan and position by the row's tokens (for ``_model_call``); and the longest prompt
a running ``generate_until`` will see (for ``_detect_batch_size``). It is set for one call and cleared after.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Handoff:
    plans_by_context: dict | None = None  # generate_until -> tok_batch_encode: context string -> Plan
    batch_plans: list | None = None  # tok_batch_encode -> _model_generate: the plans of the batch it encoded
    row_patches: dict | None = None  # loglikelihood -> _model_call: row tokens -> (Plan, position)
    probe_tokens: int | None = None  # generate_until -> _detect_batch_size: longest prompt + new tokens

    @contextmanager
    def during(self, **values):
        """Set ``values`` for one call; afterwards, whatever happens, every field is back to what it was before
        (so a batch's plans never outlive the call that encoded them)."""
        before = {item.name: getattr(self, item.name) for item in fields(self)}
        for name, value in values.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in before.items():
                setattr(self, name, value)

    def take_batch_plans(self) -> list | None:
        plans, self.batch_plans = self.batch_plans, None
        return plans


@dataclass
class SharedModes:
    """Modes evaluated in turn on one model (``taskvec compare``): regular prepares θ from the demonstrations
    it runs anyway, and hypothesis generates baseline's answers from the same query prefill."""

    modes: tuple[str, ...] = ()
    forked_baseline: dict[tuple, torch.Tensor] = field(default_factory=dict)  # query batch -> baseline's answers


def batch_key(context: torch.Tensor, max_length: int, stop) -> tuple:
    """The same query batch in the baseline run as in the hypothesis run that generated its answers."""
    return context.shape, context.cpu().numpy().tobytes(), max_length, tuple(stop)


def row_key(row) -> tuple:
    """A likelihood row's tokens without the trailing padding (HFLM pads with zeros)."""
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return tuple(row[:end])


def in_parts(n: int, key, value, call) -> list:
    """``call`` over items 0..n-1 in as few parts as possible such that within a part, equal keys have equal
    values; results come back in item order."""
    parts: list[tuple[dict, list[int]]] = []
    for i in range(n):
        k, v = key(i), value(i)
        for seen, members in parts:
            if seen.setdefault(k, v) == v:
                members.append(i)
                break
        else:
            parts.append(({k: v}, [i]))
    results: list = [None] * n
    for _, members in parts:
        for i, output in zip(members, call(members)):
            results[i] = output
    return results
