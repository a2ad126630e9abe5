"""``layer=auto``: choose block L per (model, task) on documents that are never scored.

Dev documents come from the first source that is disjoint from the evaluated documents (compared by their
rendered queries): the validation split; else the few-shot pool, leave-one-out; else the evaluated documents
themselves, cross-fitted (each half is scored at the layer chosen on the other half). A dev document never
appears among its own demonstrations. Each dev prompt is built by lm-eval's own task object (its few-shot
settings and system instruction) and turned into lm-eval's own requests.

One pass over each dev prompt's demonstrations S gives θ at every block and the full prompt's (regular)
score. Each block is then scored from a shared KV cache of every dev query minus its last token: only the
last token (patched) and the continuation run again, and only through the blocks above the patched one
(those below replay the unpatched pass, which is the baseline's). Generation tasks are scored as the paper
does (first generated token against the target's first token), multiple-choice tasks by accuracy over the
choices. The best block wins, ties to the lower block; a best block no better than the baseline by an exact
McNemar test is reported as ``no_effect``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from lm_eval.api.instance import Instance
from tqdm import tqdm

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.contexts import rendered_answer, rendered_queries
from lm_eval_taskvec.embedded import cache_dir
from lm_eval_taskvec.extraction import branch_mask_kind, common_prefix_length, prefill, states_after
from lm_eval_taskvec.layers import record_outputs, replay_outputs
from lm_eval_taskvec.stats import mcnemar_exact
from lm_eval_taskvec.theta import few_shot_requests

log = logging.getLogger("lm_eval.taskvec")

CACHE_VERSION = 3  # bump when the sweep or the meaning of a cached choice changes
MIN_DEV_DOCS = 10  # fewer disjoint documents than this: try the next source
ROW_CHUNK = 64  # dev rows scored per batch
SUFFIX_FLOOR = 256  # tokens a batch of suffixes after S may pad to before it is cut by length
STACK_TOKENS = 256  # a pass of the sweep scores several blocks' patches at once, up to this many tokens


@dataclass
class DevExample:
    doc_id: int  # index in the split the document came from
    requests: list[Instance]  # lm-eval's own requests for it: one per choice, or one generation
    gold: int | str  # index of the right choice, or the text a generation must start with


@dataclass
class DevSet:
    split: str  # where the documents came from, for the record
    examples: list[DevExample]
    scored: frozenset[int] | None = None  # cross-fit: the evaluated documents scored at this set's layer


def select_layer(lm, task_name: str) -> dict:
    """The chosen layer(s) and dev curves of ``task_name``: from memory, the disk cache, or a sweep."""
    sets = dev_sets(lm, task_name)
    key = _cache_key(lm, task_name, sets)
    if key in lm.layer_choices:
        return lm.layer_choices[key]
    path = cache_dir() / "layers" / f"{key}.json"
    choice = _read_cache(path, len(lm.blocks)) if lm.layer_cache == "on" else None
    if choice is None:
        choice = _sweep_sets(lm, task_name, sets) | {"source": "sweep"}
        if lm.layer_cache != "off":
            _write_cache(lm, path, choice)
    else:
        choice["source"] = str(path)
    lm.layer_choices[key] = choice
    _log_choice(lm, task_name, choice)
    return choice


def layer_of_document(choice: dict, doc_id: int) -> int:
    """The layer an evaluated document is scored at: one per task, or its half's when cross-fitted."""
    if "folds" not in choice:
        return choice["layer"]
    for fold in choice["folds"]:
        if doc_id in _fold_members(choice["num_docs"], choice["fold_seed"])[fold["scored_fold"]]:
            return fold["layer"]
    raise RuntimeError(f"document {doc_id} is in neither cross-fitted half of task {choice['task']!r}")


# ---------------------------------------------------------------------------------------------- dev documents
def dev_sets(lm, task_name: str) -> list[DevSet]:
    """One dev set, or two for a cross-fitted task: each a list of dev prompts as lm-eval's requests."""
    task = LOADED_TASKS.get(task_name)
    if task is None:
        raise ValueError(
            f"layer=auto chooses the layer on dev documents of task {task_name!r}, which only runs made through "
            "lm_eval or lm_eval.simple_evaluate provide: pass layer=<block index or fraction> instead"
        )
    if (task.get_config("num_fewshot") or 0) < 1:
        raise ValueError(f"layer=auto needs demonstrations: run {task_name!r} with --num_fewshot k >= 1")
    evaluated = list(task.eval_docs)
    scored_queries = {q for doc in evaluated for q in rendered_queries(task, doc)}

    def disjoint(docs):
        return [(i, d) for i, d in enumerate(docs) if not scored_queries & set(rendered_queries(task, d))]

    if task.has_validation_docs() and task.has_test_docs():
        docs = disjoint(task.validation_docs())
        if len(docs) >= MIN_DEV_DOCS:
            return [DevSet(task.config.validation_split, _examples(lm, task, docs))]
    fewshot_split = task.fewshot_cfg.split if hasattr(task, "fewshot_cfg") else None
    if fewshot_split:
        docs = disjoint(task.fewshot_docs())
        if len(docs) >= MIN_DEV_DOCS + task.get_config("num_fewshot"):
            return [DevSet(f"{fewshot_split} (leave-one-out)", _examples(lm, task, docs))]
    halves = _fold_members(len(evaluated), lm.seed)
    if min(map(len, halves)) < MIN_DEV_DOCS // 2:
        raise ValueError(
            f"task {task_name!r} has no dev documents apart from the {len(evaluated)} it scores, too few to "
            "cross-fit: pass layer=<block index or fraction of depth>, e.g. layer=0.6"
        )
    split = task.config.test_split or task.config.validation_split
    return [DevSet(f"{split} (cross-fit: scored on the other half)",
                   _examples(lm, task, [(i, evaluated[i]) for i in sorted(halves[1 - fold])]), halves[fold])
            for fold in (0, 1)]


@lru_cache(maxsize=64)
def _fold_members(num_docs: int, seed: int) -> tuple[frozenset[int], frozenset[int]]:
    order = list(range(num_docs))
    random.Random(f"{seed}|folds").shuffle(order)
    return frozenset(order[: num_docs // 2]), frozenset(order[num_docs // 2 :])


def _examples(lm, task, docs: list[tuple[int, dict]]) -> list[DevExample]:
    """``num_dev`` dev prompts over ``docs`` (cycled with fresh demonstrations when there are fewer docs)."""
    picked = random.Random(lm.seed).sample(docs, min(lm.num_dev, len(docs)))
    picked = [picked[i % len(picked)] for i in range(lm.num_dev)]
    requests = few_shot_requests(task, picked, task.get_config("num_fewshot"), lm.seed)
    return [DevExample(doc_id, reqs, _gold(task, doc)) for (doc_id, doc), reqs in zip(picked, requests)]


def _gold(task, doc) -> int | str:
    if task.get_config("output_type") == "generate_until":
        return rendered_answer(task, doc)
    target, choices = task.doc_to_target(doc), task.doc_to_choice(doc)
    return target if isinstance(target, int) else choices.index(target)


# ---------------------------------------------------------------------------------------------- scoring
def _sweep_sets(lm, task_name: str, sets: list[DevSet]) -> dict:
    results = _score(lm, task_name, sets)
    if len(results) == 1:
        return {"task": task_name, **_summary(*results[0]), "dev_split": sets[0].split,
                "dev_docs": sorted({ex.doc_id for ex in sets[0].examples})}
    pooled = [torch.cat(parts, -1) for parts in zip(*results)]
    folds = [_summary(*result) | {"scored_fold": fold, "dev_docs": sorted({ex.doc_id for ex in dev.examples})}
             for fold, (dev, result) in enumerate(zip(sets, results))]
    n = len(LOADED_TASKS[task_name].eval_docs)
    return {"task": task_name, **_summary(*pooled), "dev_split": sets[0].split, "folds": folds,
            "num_docs": n, "fold_seed": lm.seed}


def _summary(layer_hits: torch.Tensor, baseline: torch.Tensor, regular: torch.Tensor) -> dict:
    curve = layer_hits.float().mean(-1)
    best = max(range(len(curve)), key=lambda layer: (curve[layer].item(), -layer))
    gained = int((layer_hits[best] & ~baseline).sum())
    lost = int((~layer_hits[best] & baseline).sum())
    p_value = mcnemar_exact(gained, lost)
    return {"layer": best, "dev_accuracy": [round(v, 4) for v in curve.tolist()],
            "baseline_accuracy": round(baseline.float().mean().item(), 4),
            "regular_accuracy": round(regular.float().mean().item(), 4),
            "no_effect": not (gained > lost and p_value < 0.05), "p_value": round(p_value, 4),
            "num_dev": layer_hits.shape[-1]}


def _score(lm, task_name: str, sets: list[DevSet]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per dev set, per dev prompt: right at each block (Tensor[blocks, prompts]), right in baseline, right in
    regular. The sets run together: cross-fitted halves draw the same demonstrations for most of their prompts,
    and a shared S runs once."""
    examples = [ex for dev in sets for ex in dev.examples]
    requests = [r for ex in examples for r in ex.requests]
    plans = lm.plan(requests, layer=0, extract=False)
    layers = list(range(len(lm.blocks)))
    generation = requests[0].request_type == "generate_until"
    if generation:
        targets = [lm.tok_encode(ex.gold, add_special_tokens=False)[:1] for ex in examples]
        if not all(targets):
            raise ValueError(f"task {task_name!r} has a dev document with an empty target: nothing to score")
        queries = [(lm.tok_encode(p.query), t) for p, t in zip(plans, targets)]
        fulls = [(lm.tok_encode(r.args[0])[-lm.max_length + 1 :], t) for r, t in zip(requests, targets)]
    else:
        queries = [lm._encode_pair(p.query, r.args[1]) for p, r in zip(plans, requests)]
        fulls = [lm._encode_pair(*r.args) for r in requests]
    regular = _regular_and_thetas(lm, plans, fulls, layers, f"{task_name}: layer sweep, θ at {len(layers)} blocks")
    desc = f"{task_name}: dev accuracy by block"
    scores = _fork_scores(lm, queries, [None] + [[replace(p, layer=layer) for p in plans] for layer in layers], desc)
    baseline, per_block = scores[0], scores[1:]
    hits = [_hits(examples, scores, generation).split([len(dev.examples) for dev in sets], -1)
            for scores in (per_block, baseline, regular)]
    return list(zip(*hits))


def _hits(examples: list[DevExample], scores: torch.Tensor, generation: bool) -> torch.Tensor:
    """Right or wrong per dev prompt, from _fork_scores' per-row scores [..., rows, 2]: the first token for a
    generation, the choice with the highest log-likelihood otherwise."""
    if generation:
        return scores[..., 1] > 0
    hits, row = [], 0
    for ex in examples:
        k = len(ex.requests)
        hits.append(scores[..., row : row + k, 0].argmax(-1) == ex.gold)
        row += k
    return torch.stack(hits, -1)


def _regular_and_thetas(lm, plans: list, fulls: list[tuple[list[int], list[int]]], layers: list[int],
                        desc: str) -> torch.Tensor:
    """Regular mode's per-row scores (as ``_fork_scores``) of the full prompts ``fulls``, and θ at every listed
    block for each plan's key, with the demonstrations S run once for both: per θ key, the tokens its θ
    prompts [S, x'] share with its full prompts fill one KV cache, from which the dummies' suffixes give θ (one
    pass through the deepest block), and each full prompt's rest and continuation give regular's scores."""
    rows_of: dict = {}
    for i, plan in enumerate(plans):
        rows_of.setdefault(plan.theta_key, []).append(i)
    families = {key: lm.theta_prompts(key) for key in rows_of}
    keys = sorted(rows_of, key=lambda key: common_prefix_length(families[key]))  # similar S lengths share a batch
    size, mask_kind = lm.extract_batch_size, branch_mask_kind(lm.model)
    out = torch.empty(len(fulls), 2)
    for start in tqdm(range(0, len(keys), size), desc=desc, disable=lm.rank != 0):
        batch = keys[start : start + size]
        rows = [i for key in batch for i in rows_of[key]]
        contexts = list(dict.fromkeys((plans[i].theta_key, tuple(fulls[i][0])) for i in rows))
        which = [contexts.index((plans[i].theta_key, tuple(fulls[i][0]))) for i in rows]
        owner = [batch.index(key) for key, _ in contexts]
        cuts = [common_prefix_length([*(list(ctx) for k, ctx in contexts if k == key), *families[key]]) for key in batch]
        cuts = cuts if min(cuts) > 0 else [0] * len(cuts)  # a prompt sharing nothing: no prefix for this batch
        with torch.no_grad(), lm._autocast():
            prefix = prefill(lm.model, [families[key][0][:cut] for key, cut in zip(batch, cuts)], lm.blocks[-1])
            members = [(b, prompt[cuts[b] :]) for b, key in enumerate(batch) for prompt in families[key]]
            found = _states_after_prefix(lm, prefix, members, layers)
            # Queries differ in length: contexts of similar length grow together, then their rows run.
            rest = [list(ctx[cuts[b] : -1]) for (_, ctx), b in zip(contexts, owner)]
            for part in _length_chunks(range(len(contexts)), lambda c: len(rest[c]), SUFFIX_FLOOR):
                grown = prefix.take([owner[c] for c in part])
                grown.grow(lm.model, [rest[c] for c in part], lm.blocks[-1])
                context_of = {i: part.index(c) for i, c in zip(rows, which) if c in part}
                units = _units(list(context_of), fulls, [], [contexts[c][1][:-1] for c in part], context_of,
                               mask_kind is not None)
                for chunk in _length_chunks(units, lambda unit: _unit_length(unit, fulls)):
                    output, columns = grown.take([unit.context for unit in chunk]).extend_branches(
                        lm.model, [unit.head for unit in chunk],
                        [[fulls[i][1][:-1] for i in unit.rows] for unit in chunk], mask_kind)
                    for i, score in _unit_scores(output.logits, columns, chunk, fulls).items():
                        out[i] = score
        row = 0
        for key in batch:
            k = len(families[key])
            for layer in layers:  # θ: the mean over the dummies
                lm._theta_cache.setdefault((layer, key), found[layer][row : row + k].float().mean(0))
            row += k
    return out


def _states_after_prefix(lm, prefix, members: list[tuple[int, list[int]]], layers: list[int]) -> dict:
    """``states_after`` for (prefix row, suffix) members, in chunks of similar suffix length (dummy queries
    differ in length, and a batch pads every suffix to its longest): {layer: Tensor[members, hidden]}."""
    found: dict = {}
    for part in _length_chunks(range(len(members)), lambda m: len(members[m][1]), SUFFIX_FLOOR):
        states = states_after(lm.model, lm.blocks, prefix.take([members[m][0] for m in part]),
                              [members[m][1] for m in part], layers)
        for layer, value in states.items():
            found.setdefault(layer, value.new_empty(len(members), value.shape[-1]))[part] = value
    return found


@dataclass
class _Unit:
    """Rows run as one sequence: one context (a row of the prefix cache) with the same plan per patch, its
    tokens after the cached prefix (``head``), then each row's continuation as a branch of its own."""
    context: int
    head: list[int]
    rows: list[int]
    plans: tuple


def _units(members: list[int], rows, patches: list, cached: list[list[int]], context_of, branches: bool) -> list[_Unit]:
    """The given rows in units: rows of one context and one plan per patch together (with ``branches``), each
    row alone otherwise. ``context_of[i]`` (a list or a dict) is row i's context, as an index in ``cached``."""
    units: dict = {}
    for i in members:
        plans = tuple(patch[i] if patch else None for patch in patches)
        key = (context_of[i], plans) if branches else i
        if key not in units:
            units[key] = _Unit(context_of[i], rows[i][0][len(cached[context_of[i]]) :], [], plans)
        units[key].rows.append(i)
    return list(units.values())


def _unit_length(unit: _Unit, rows) -> int:
    """Tokens the unit's sequence runs: its head, then every row's continuation but its last token, as a trie
    (choices that begin alike share those tokens)."""
    return len(unit.head) + len({tuple(rows[i][1][:k]) for i in unit.rows for k in range(1, len(rows[i][1]))})


def _unit_scores(logits, columns: list[list[list[int]]], chunk: list[_Unit], rows) -> dict[int, torch.Tensor]:
    """Per row of the units in ``chunk``: the continuation's summed log-probability, and whether its first
    token is the argmax (from the head's last token, then from the columns of the row's branch)."""
    scores = {}
    for u, unit in enumerate(chunk):
        first = logits[u, len(unit.head) - 1].float().cpu().log_softmax(-1)
        for own, i in zip(columns[u], unit.rows):
            cont = rows[i][1]
            rest = logits[u, own].float().cpu().log_softmax(-1)
            total = first[cont[0]] + rest.gather(1, torch.tensor(cont[1:], dtype=torch.long)[:, None]).sum()
            scores[i] = torch.stack([total, (first.argmax() == cont[0]).float()])
    return scores


def _fork_scores(lm, rows: list[tuple[list[int], list[int]]], patches: list, desc: str | None = None) -> torch.Tensor:
    """Score each row's continuation after its context, once per entry of ``patches`` (plans to patch at the
    context's last token, or None). Tensor[len(patches), rows, 2]: the continuation's summed log-probability,
    and whether its first token is the argmax. Distinct contexts minus their last token run once into a KV
    cache (ROW_CHUNK contexts at a time). Rows sharing a context and its plans (a question's choices) run as
    branches of one sequence (``_units``), so its last token runs once, and so do tokens the choices begin
    with alike; units run in chunks of similar length (``_length_chunks``). Per chunk, one plain pass records
    every block's output; a patch at block l replays blocks 0..l from that record and runs only the blocks
    above l. Patches at neighbouring blocks run as copies of the chunk in one pass (up to STACK_TOKENS
    tokens), replayed up to the lowest of them: a pass of a few dozen tokens runs far below the rate of a
    larger one."""
    out = torch.empty(len(patches), len(rows), 2)
    contexts = sorted(dict.fromkeys(tuple(ctx) for ctx, _ in rows), key=len)  # a group's prefill pads less
    index = {ctx: c for c, ctx in enumerate(contexts)}
    context_of = [index[tuple(ctx)] for ctx, _ in rows]
    mask_kind = branch_mask_kind(lm.model)
    groups = []  # up to ROW_CHUNK distinct contexts share one KV cache
    for first in range(0, len(contexts), ROW_CHUNK):
        group = contexts[first : first + ROW_CHUNK]
        cached = [list(c[:-1]) for c in group] if min(map(len, group)) > 1 else [[] for _ in group]
        members = [i for i in range(len(rows)) if first <= context_of[i] < first + ROW_CHUNK]
        units = _units(members, rows, patches, cached, [c - first for c in context_of], mask_kind is not None)
        groups.append((cached, _length_chunks(units, lambda unit: _unit_length(unit, rows))))
    bar = tqdm(total=sum(len(chunks) for _, chunks in groups) * len(patches), desc=desc,
               disable=desc is None or lm.rank != 0)
    replay, check = True, True
    for cached, chunks in groups:
        with torch.no_grad():
            context_cache = prefill(lm.model, cached, stop_block=lm.blocks[-1])
        for chunk in chunks:
            which = [unit.context for unit in chunk]
            heads = [unit.head for unit in chunk]
            branches = [[rows[i][1][:-1] for i in unit.rows] for unit in chunk]
            at = torch.tensor([len(head) - 1 for head in heads])

            def run(plans=(), replayed: int = 0, copies: int = 1):
                with lm.patched(list(plans), at.repeat(copies)) if plans else nullcontext(), \
                        replay_outputs(lm.blocks, recorded[:replayed], copies):
                    return context_cache.take(which * copies).extend_branches(
                        lm.model, heads * copies, branches * copies, mask_kind)

            def score(p, logits, columns):
                for i, row_score in _unit_scores(logits, columns, chunk, rows).items():
                    out[p, i] = row_score
                bar.update()

            with torch.no_grad():
                with record_outputs(lm.blocks) as recorded:
                    plain = run()
                parts = [[unit.plans[p] for unit in chunk] if patches[p] else [] for p in range(len(patches))]
                lowest = [min((p.layer for p in part if p.theta_key is not None), default=None) for part in parts]
                checked = None
                if check and any(layer is not None for layer in lowest):
                    # Replaying assumes a block reads nothing but its inputs and its own KV cache: check it once
                    # against a full pass, on the longest units, at the patch that replays the most blocks but
                    # leaves one to run (at the last block there would be nothing left to show a difference).
                    check = False
                    checked = max((p for p in range(len(parts)) if lowest[p] is not None),
                                  key=lambda p: (lowest[p] < len(lm.blocks) - 1, lowest[p]))
                    full = run(parts[checked])
                    replay = torch.allclose(run(parts[checked], lowest[checked] + 1)[0].logits, full[0].logits,
                                            rtol=1e-4, atol=1e-4)
                    if not replay:
                        lm.warn_once(f"{type(lm.model).__name__}: a block's output depends on more than its inputs "
                                     "and its own KV cache, so the layer sweep runs every block for every patch (slower)")
                    score(checked, full[0].logits, full[1])
                for p in range(len(parts)):
                    if lowest[p] is None:
                        score(p, plain[0].logits, plain[1])
                # Patches at neighbouring blocks share a pass (a small pass runs slowly): replayed up to the
                # lowest of them, each copy of the chunk patched at its own block.
                todo = sorted((p for p in range(len(parts)) if lowest[p] is not None and p != checked),
                              key=lambda p: lowest[p])
                size = max(1, STACK_TOKENS // (len(chunk) * _unit_length(chunk[0], rows)))
                for start in range(0, len(todo), size):
                    stack = todo[start : start + size]
                    output, columns = run([plan for p in stack for plan in parts[p]],
                                          min(lowest[p] for p in stack) + 1 if replay else 0, len(stack))
                    for k, p in enumerate(stack):
                        score(p, output.logits[k * len(chunk) : (k + 1) * len(chunk)], columns)
    bar.close()
    return out


def _length_chunks(rows, length, floor: int = 0) -> list[list]:
    """``rows``, longest first, cut into chunks of at most ROW_CHUNK whose padding (every row of a chunk is as
    long as its first) adds at most an eighth to the real tokens, or keeps the chunk within ``floor`` tokens
    (a pass after a long S costs a copy of its KV cache: short rows are cheaper padded than apart)."""
    chunks, chunk, real = [], [], 0
    for row in sorted(rows, key=length, reverse=True):
        padded = (len(chunk) + 1) * length(chunk[0]) if chunk else 0
        if chunk and (len(chunk) == ROW_CHUNK or (padded > 1.125 * (real + length(row)) and padded > floor)):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(row)
        real += length(row)
    return chunks + [chunk] if chunk else chunks


# ---------------------------------------------------------------------------------------------- the cache
def _cache_key(lm, task_name: str, sets: list[DevSet]) -> str:
    model = lm.model
    config = model.config.to_dict()
    identity = [CACHE_VERSION, config.get("_name_or_path"), getattr(model.config, "_commit_hash", None),
                getattr(lm, "revision", None), str(model.dtype), json.dumps(config, sort_keys=True, default=str),
                weights_fingerprint(model), len(lm.blocks), task_name, lm.num_dummy, lm.seed,
                [(dev.split, sorted(dev.scored or ()), [(ex.doc_id, [r.args for r in ex.requests], ex.gold)
                                                          for ex in dev.examples]) for dev in sets]]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:24]


def weights_fingerprint(model) -> str:
    """Changes when any weight changes: every tensor's sum and norm (in float64) and a strided sample of it.
    Remembered per model until a parameter is replaced or modified in place (torch's version counters)."""
    state = tuple((name, param.data_ptr(), param._version) for name, param in model.named_parameters())
    remembered = getattr(model, "_taskvec_fingerprint", None)
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
            summary = torch.stack([flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)])
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes() + summary.cpu().numpy().tobytes())
    model._taskvec_fingerprint = (state, digest.hexdigest())
    return digest.hexdigest()


def _read_cache(path, num_blocks: int) -> dict | None:
    """A cached choice, or None (with a warning) for anything that is not one for a model of this depth."""
    try:
        choice = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("layer cache %s is unreadable (%s): sweeping again", path, err)
        return None
    if not _valid_choice(choice, num_blocks):
        log.warning("layer cache %s does not hold a layer choice for a model of %d blocks: sweeping again", path,
                    num_blocks)
        return None
    return choice


def _valid_choice(choice, num_blocks: int) -> bool:
    """Everything select_layer, _log_choice and layer_of_document read from a choice is there, of its type."""
    def number(value) -> bool:
        return type(value) in (int, float)

    def valid_part(part) -> bool:
        if not isinstance(part, dict):
            return False
        layer, curve = part.get("layer"), part.get("dev_accuracy")
        return (type(layer) is int and 0 <= layer < num_blocks and isinstance(curve, list)
                and len(curve) == num_blocks and all(map(number, curve))
                and all(number(part.get(k)) for k in ("baseline_accuracy", "regular_accuracy", "p_value"))
                and type(part.get("no_effect")) is bool and type(part.get("num_dev")) is int)

    if not valid_part(choice) or not isinstance(choice.get("dev_split"), str):
        return False
    folds = choice.get("folds")
    return folds is None or (isinstance(folds, list) and len(folds) == 2 and all(map(valid_part, folds))
                             and [type(f.get("scored_fold")) for f in folds] == [int, int]
                             and sorted(f["scored_fold"] for f in folds) == [0, 1]
                             and type(choice.get("num_docs")) is int and type(choice.get("fold_seed")) is int)


def _write_cache(lm, path, choice: dict) -> None:
    """Atomic: a temporary file of its own renamed into place, so concurrent writers and readers never see
    half a file. An unwritable cache keeps the choice in memory and says so."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump({k: v for k, v in choice.items() if k != "source"}, file)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
        lm.warn_once(f"layer cache {path.parent} is not writable ({err}): layer choices stay in memory for this "
                     "process only; set LM_EVAL_TASKVEC_CACHE to a writable folder")


def _log_choice(lm, task_name: str, choice: dict) -> None:
    """One line per chosen layer; a warning when it does nothing the query alone does not."""
    for part, scope in ([(f, f" half {f['scored_fold']}") for f in choice["folds"]] if "folds" in choice
                        else [(choice, "")]):
        line = (f"{task_name}{scope}: block {part['layer']} (0-based) of {len(lm.blocks)} blocks, dev accuracy "
                f"{part['dev_accuracy'][part['layer']]:.2f} (baseline {part['baseline_accuracy']:.2f}, regular "
                f"{part['regular_accuracy']:.2f}) on {part['num_dev']} prompts from {choice['dev_split']} "
                f"({choice['source']})")
        if part["no_effect"]:
            log.warning("%s. NO EFFECT: no block beats the query alone on the dev prompts (exact McNemar p=%.2f), "
                        "so hypothesis mode adds nothing here", line, part["p_value"])
        else:
            log.info("%s", line)
