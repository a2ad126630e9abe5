"""The public API for θ, shared by hf-taskvec, layer=auto and every analysis: few-shot requests built by
lm-eval's own task objects, θ extracted at any blocks, and requests run with θ patched in.

    requests = few_shot_requests(task, docs, num_fewshot=4, seed=0)   # one list of Instances per document
    thetas = task_vectors(lm, [r[0] for r in requests], layers=[15])  # Tensor[layers, requests, hidden]
    plans = lm.plan(requests_of_b, layer=15)                           # S, x, dummies and θ of each request
    lm.generate_planned(requests_of_a, [replace(p, query=...) ...])    # run any text with any planned θ
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def few_shot_requests(task, docs: list[tuple[int, dict]], num_fewshot: int, seed: int) -> list[list]:
    """lm-eval's own requests for each ``(doc_id, doc)``: its few-shot context (with the run's system
    instruction) built with demonstrations drawn from ``seed`` that never include the document itself."""
    settings = getattr(task, "taskvec_prompt_settings", None) or {}
    out = []
    with _seeded_demos_without(task, seed) as exclude:
        for doc_id, doc in docs:
            exclude(doc)
            context = task.fewshot_context(doc, num_fewshot, system_instruction=settings.get("system_instruction"),
                                           gen_prefix=task.doc_to_prefix(doc))
            requests = task.construct_requests(doc=doc, ctx=context, metadata=(task.config.task, doc_id, 1))
            out.append([r for r in (requests if isinstance(requests, list) else [requests]) if r.args[0]])
    return out


@contextmanager
def _seeded_demos_without(task, seed: int):
    """Demonstrations drawn with a fixed seed, never the document being prompted (lm-eval's sampler drops it
    only when the few-shot split is the test split); the run's own sampler state is restored after."""
    sampler, saved = task.sampler, task.sampler.rnd
    sample, current = sampler.sample, {}
    sampler.set_rnd(seed)
    sampler.sample = lambda n, eval_doc=None, **kwargs: sample(n, eval_doc=current["doc"], **kwargs)
    try:
        yield lambda doc: current.update(doc=doc)
    finally:
        del sampler.sample
        sampler.rnd = saved


def task_vectors(lm, requests: list, layers: list[int]) -> torch.Tensor:
    """θ of each request (block outputs at the last token of [S, x'], averaged over its dummies) at each of
    ``layers``: Tensor[len(layers), len(requests), hidden], from one extraction pass."""
    plans = lm.plan(requests, layer=layers[0], extract=False)
    lm.ensure_thetas({(layer, plan.theta_key) for plan in plans for layer in layers})
    return torch.stack([torch.stack([lm._theta_cache[(layer, plan.theta_key)] for plan in plans]) for layer in layers])
