"""Choosing the layer L per (model, task) on the task's validation split, never on test answers.

One extraction pass gives θ at every block for the dev prompts; each block is then scored by one patched
pass over the dev queries. Generation tasks are scored as the paper does: the patched run's first token
against the target's first token. Multiple-choice tasks are scored by accuracy over the choices. The best
block wins (ties go to the lower block). Choices are cached on disk, keyed by the model's identity (name,
revision, dtype, a fingerprint of its weights), the task, its dev prompts (format, demonstrations, seed)
and the number of dummies, so a rerun skips the sweep and a changed model or format never reuses a choice.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch
from lm_eval.api.instance import Instance
from tqdm import tqdm

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.embedded import cache_dir
from lm_eval_taskvec.extraction import prefill

CACHE_VERSION = 2  # bump when the sweep itself changes


@dataclass
class DevExample:
    context: str
    choices: list[str]  # continuations, target delimiter included; generation tasks: [target]
    gold: int


def select_layer(lm, task_name: str) -> dict:
    """The chosen layer and dev curve of ``task_name``: from the disk cache, or a sweep over every block."""
    dev = dev_examples(lm, task_name)
    path = cache_dir() / "layers" / f"{_cache_key(lm, task_name, dev)}.json"
    if lm.layer_cache == "on" and path.exists():
        return json.loads(path.read_text()) | {"source": str(path)}
    curve = sweep(lm, task_name, dev)
    best = max(range(len(curve)), key=lambda layer: (curve[layer], -layer))
    choice = {"layer": best, "dev_accuracy": curve, "num_dev": len(dev), "task": task_name}
    if lm.layer_cache != "off":  # "refresh" overwrites
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(choice))
    return choice | {"source": "sweep"}


def dev_examples(lm, task_name: str) -> list[DevExample]:
    """Up to ``num_dev`` validation documents of the run's own task object, with its few-shot settings."""
    task = LOADED_TASKS.get(task_name)
    if task is None:
        raise ValueError(
            f"layer=auto chooses the layer on the validation split of task {task_name!r}, which only runs made "
            "through lm_eval or lm_eval.simple_evaluate provide: pass layer=<block index or fraction> instead"
        )
    if not task.has_validation_docs():
        raise ValueError(f"layer=auto needs a validation split, and task {task_name!r} has none: pass layer=<block>")
    num_fewshot = task.get_config("num_fewshot") or 0
    if num_fewshot < 1:
        raise ValueError(f"layer=auto needs demonstrations: run {task_name!r} with --num_fewshot k >= 1")
    docs = list(task.validation_docs())
    picked = sorted(random.Random(lm.seed).sample(range(len(docs)), min(lm.num_dev, len(docs))))
    saved = task.sampler.rnd  # leave the run's own few-shot draws untouched
    task.sampler.set_rnd(lm.seed)
    try:
        contexts = [task.fewshot_context(docs[i], num_fewshot) for i in picked]
    finally:
        task.sampler.rnd = saved
    delimiter = task.get_config("target_delimiter")
    examples = []
    for i, context in zip(picked, contexts):
        doc, target = docs[i], task.doc_to_target(docs[i])
        if task.get_config("output_type") == "generate_until":
            target = target[0] if isinstance(target, list) else target
            examples.append(DevExample(context, [delimiter + str(target)], 0))
        else:
            choices = task.doc_to_choice(doc)
            gold = target if isinstance(target, int) else choices.index(target)
            examples.append(DevExample(context, [delimiter + c for c in choices], gold))
    return examples


def sweep(lm, task_name: str, dev: list[DevExample]) -> list[float]:
    """Dev accuracy of hypothesis mode at every block."""
    requests = [Instance("loglikelihood", {}, (ex.context, c), i, (task_name, i, 1))
                for i, ex in enumerate(dev) for c in ex.choices]
    layers = list(range(len(lm.blocks)))
    first = lm.plan(requests, layer=layers[0], extract=False)
    lm.ensure_thetas({(layer, p.theta_key) for p in first for layer in layers},  # one pass, all blocks
                     f"{task_name}: layer sweep, θ at {len(layers)} blocks")
    scoring = tqdm(layers, desc=f"{task_name}: layer sweep, scoring {len(layers)} blocks", disable=lm.rank != 0)
    if all(len(ex.choices) == 1 for ex in dev):
        return _first_token_curve(lm, requests, layers, scoring)
    curve = []
    for layer in scoring:
        scores = iter(lp for lp, _ in lm.loglikelihood_planned(requests, lm.plan(requests, layer), disable_tqdm=True))
        correct = [max(range(len(ex.choices)), key=[next(scores) for _ in ex.choices].__getitem__) == ex.gold
                   for ex in dev]
        curve.append(sum(correct) / len(dev))
    return curve


def _first_token_curve(lm, requests, layers: list[int], scoring) -> list[float]:
    """First-token accuracy at every layer: the queries minus their last token run once into a KV cache,
    then each layer re-runs only the last token, patched, from a copy of that cache."""
    plans = {layer: lm.plan(requests, layer) for layer in layers}
    pairs = [lm._encode_pair(plan.query, req.args[1]) for req, plan in zip(requests, plans[layers[0]])]
    targets = torch.tensor([cont[0] for _, cont in pairs])
    with torch.no_grad():
        # Stopping after the last block fills the cache without computing logits for every prefix token.
        prefix = prefill(lm.model, [ctx[:-1] for ctx, _ in pairs], stop_block=lm.blocks[-1])
        curve = []
        for layer in scoring:  # layers, with a progress bar
            with lm.patched(plans[layer], -1):
                logits = prefix.copy().extend(lm.model, [ctx[-1:] for ctx, _ in pairs]).logits[:, -1]
            curve.append((logits.argmax(-1).cpu() == targets).float().mean().item())
    return curve


def _cache_key(lm, task_name: str, dev: list[DevExample]) -> str:
    model, h = lm.model, hashlib.sha256()
    config = model.config.to_dict()
    identity = [CACHE_VERSION, config.get("_name_or_path"), getattr(lm, "revision", None), str(model.dtype),
                json.dumps(config, sort_keys=True, default=str), task_name, lm.num_dummy, lm.seed,
                lm.fewshot_delimiter, [(ex.context, ex.choices, ex.gold) for ex in dev]]
    h.update(json.dumps(identity, default=str).encode())
    for tensor in (model.get_input_embeddings().weight, next(lm.blocks[-1].parameters())):
        h.update(tensor.detach().float().flatten()[:65536].cpu().numpy().tobytes())  # weights fingerprint
    return h.hexdigest()[:24]
