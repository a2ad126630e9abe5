"""The layer sweep: every block scored on the dev prompts, with the query alone (baseline) and the full prompt
(regular) on the same prompts.

One pass over each dev prompt's demonstrations S gives θ at every block and the full prompt's (regular)
score. Each block is then scored from a shared KV cache of every dev query minus its last token: only the
last token (patched) and the continuation run again, and only through the blocks above the patched one
(those below replay the unpatched pass, which is the baseline's). What a block is scored by is the task's
``criterion``: generation tasks with short answers as the paper does (first generated token against the
target's first token), generation tasks with long answers by the mean log-likelihood per token of the
reference continuation, multiple-choice tasks by accuracy over the choices. The best block wins, ties to the
lower block; a best block no better than the baseline (an exact McNemar test for accuracies, the paired
bootstrap for log-likelihoods) is reported as ``no_effect``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.extraction import (
    Prefix,
    branch_mask_kind,
    common_prefix_length,
    prefill,
    states_after,
    within_window,
)
from lm_eval_taskvec.layers import record_outputs, replay_outputs
from lm_eval_taskvec.selection import function_vector
from lm_eval_taskvec.selection.criterion import REFERENCE_LOGLIKELIHOOD, REFERENCE_TOKENS
from lm_eval_taskvec.selection.dev import DevExample, DevSet
from lm_eval_taskvec.selection.interface import SweepModel
from lm_eval_taskvec.stats import mcnemar_exact, paired_bootstrap
from lm_eval_taskvec.theta import ThetaKey

ROW_CHUNK = 64  # dev rows scored per batch
SUFFIX_FLOOR = 256  # tokens a batch of suffixes after S may pad to before it is cut by length
STACK_TOKENS = 256  # a pass of the sweep scores several blocks' patches at once, up to this many tokens


def choose(lm: SweepModel, task_name: str, sets: list[DevSet], criterion: str | None = None) -> dict:
    """The choice for ``task_name``: its block, dev curve, baseline and regular dev accuracy and p-value (and,
    scored by the reference's log-likelihood, those scores too); a cross-fitted task pools its two halves and
    has one such entry per half under ``folds``. ``criterion`` defaults to the old one for the request type."""
    long_answers = criterion == REFERENCE_LOGLIKELIHOOD
    results = score(lm, task_name, sets, criterion) if long_answers else score(lm, task_name, sets)

    def summarize(*scores) -> dict:
        found = (reference_summary if long_answers else summary)(*scores)
        return found | ({"criterion": criterion} if criterion else {})

    if len(results) == 1:
        return {
            "task": task_name,
            **summarize(*results[0]),
            "dev_split": sets[0].split,
            "dev_docs": sorted({ex.doc_id for ex in sets[0].examples}),
        }
    pooled = [torch.cat(parts, -1) for parts in zip(*results)]
    folds = [
        summarize(*result) | {"scored_fold": fold, "dev_docs": sorted({ex.doc_id for ex in dev.examples})}
        for fold, (dev, result) in enumerate(zip(sets, results))
    ]
    n = len(LOADED_TASKS[task_name].eval_docs)
    return {
        "task": task_name,
        **summarize(*pooled),
        "dev_split": sets[0].split,
        "folds": folds,
        "num_docs": n,
        "fold_seed": lm.settings.seed,
    }


def summary(layer_hits: torch.Tensor, baseline: torch.Tensor, regular: torch.Tensor) -> dict:
    """The best block (ties to the lower) and whether it beats the query alone (exact McNemar, p < 0.05)."""
    curve = layer_hits.float().mean(-1)
    best = max(range(len(curve)), key=lambda layer: (curve[layer].item(), -layer))
    gained = int((layer_hits[best] & ~baseline).sum())
    lost = int((~layer_hits[best] & baseline).sum())
    p_value = mcnemar_exact(gained, lost)
    return {
        "layer": best,
        "dev_accuracy": [round(v, 4) for v in curve.tolist()],
        "baseline_accuracy": round(baseline.float().mean().item(), 4),
        "regular_accuracy": round(regular.float().mean().item(), 4),
        "no_effect": not (gained > lost and p_value < 0.05),
        "p_value": round(p_value, 4),
        "num_dev": layer_hits.shape[-1],
    }


def reference_summary(layer_scores: torch.Tensor, baseline: torch.Tensor, regular: torch.Tensor) -> dict:
    """The block whose patch makes the references likeliest (ties to the lower), from ``score``'s
    [2, ..., prompts] tensors (mean log-likelihood per reference token; first token right), and whether it
    beats the query alone (paired bootstrap over the dev prompts, p < 0.05). The first-token accuracies are
    kept under their old names, for the record."""
    curve = layer_scores[0].mean(-1)
    best = max(range(len(curve)), key=lambda layer: (curve[layer].item(), -layer))
    gain = (curve[best] - baseline[0].mean()).item()
    p_value = paired_bootstrap(layer_scores[0, best].tolist(), baseline[0].tolist())
    return {
        "layer": best,
        "dev_score": [round(v, 4) for v in curve.tolist()],
        "baseline_score": round(baseline[0].mean().item(), 4),
        "regular_score": round(regular[0].mean().item(), 4),
        "dev_accuracy": [round(v, 4) for v in layer_scores[1].mean(-1).tolist()],
        "baseline_accuracy": round(baseline[1].mean().item(), 4),
        "regular_accuracy": round(regular[1].mean().item(), 4),
        "no_effect": not (gain > 0 and p_value < 0.05),
        "p_value": round(p_value, 4),
        "num_dev": layer_scores.shape[-1],
    }


def score(
    lm: SweepModel, task_name: str, sets: list[DevSet], criterion: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per dev set, per dev prompt: right at each block (Tensor[blocks, prompts]), right in baseline, right in
    regular; by ``reference_loglikelihood``, Tensor[2, ..., prompts] each: the reference's mean log-likelihood
    per token, and whether its first token is the argmax. The sets run together: cross-fitted halves draw the
    same demonstrations for most of their prompts, and a shared S runs once."""
    examples = [ex for dev in sets for ex in dev.examples]
    requests = [r for ex in examples for r in ex.requests]
    plans = lm.planner.plan(requests)
    layers = list(range(len(lm.blocks)))
    generation = requests[0].request_type == "generate_until"
    if generation and criterion == REFERENCE_LOGLIKELIHOOD:
        queries = [reference_row(lm, p.query, ex.gold, task_name) for p, ex in zip(plans, examples)]
        fulls = [
            (lm.tok_encode(r.args[0])[-(lm.max_length - len(ref)) :], ref) for r, (_, ref) in zip(requests, queries)
        ]
    elif generation:
        targets = [lm.tok_encode(ex.gold, add_special_tokens=False)[:1] for ex in examples]
        if not all(targets):
            raise ValueError(f"task {task_name!r} has a dev document with an empty target: nothing to score")
        queries = [(lm.tok_encode(p.query), t) for p, t in zip(plans, targets)]
        fulls = [(lm.tok_encode(r.args[0])[-lm.max_length + 1 :], t) for r, t in zip(requests, targets)]
    else:
        queries = [lm.encode_pair(p.query, r.args[1]) for p, r in zip(plans, requests)]
        fulls = [lm.encode_pair(*r.args) for r in requests]
    seen = (task_name, tuple((tuple(context), tuple(continuation)) for context, continuation in fulls))
    regular = lm.choice_cache.regular_scores.get(seen)
    if regular is None or lm.thetas.missing({(layer, p.theta_key) for p in plans for layer in layers}):
        regular = regular_and_thetas(lm, plans, fulls, layers, f"{task_name}: layer sweep, θ at {len(layers)} blocks")
        lm.choice_cache.regular_scores[seen] = regular
    if lm.settings.vector != "prompt":  # every dev prompt is patched with the task's one θ
        if lm.settings.vector == "task_mean":
            one = task_mean_of(lm, requests, plans)
        else:
            one = function_vector.ensure(lm, task_name, sets)[0]
        lm.thetas.ensure({(layer, one) for layer in layers})
        plans = [replace(p, theta_key=one) for p in plans]
    desc = f"{task_name}: dev accuracy by block"
    scores = fork_scores(lm, queries, [None] + [[replace(p, layer=layer) for p in plans] for layer in layers], desc)
    baseline, per_block = scores[0], scores[1:]
    sizes = [len(dev.examples) for dev in sets]
    if generation and criterion == REFERENCE_LOGLIKELIHOOD:
        lengths = torch.tensor([float(len(ref)) for _, ref in queries])
        found = [torch.stack([s[..., 0] / lengths, s[..., 1]]).split(sizes, -1) for s in (per_block, baseline, regular)]
        return list(zip(*found))
    hits = [_hits(examples, scores, generation).split(sizes, -1) for scores in (per_block, baseline, regular)]
    return list(zip(*hits))


def task_mean_of(lm: SweepModel, requests: list, plans: list | None = None) -> ThetaKey:
    """The key of the mean θ over the dev prompts ``requests`` (their ``plans``, if made already)."""
    return ThetaKey.task_mean(p.theta_key for p in plans or lm.planner.plan(requests))


def reference_row(lm: SweepModel, query: str, reference: str, task_name: str) -> tuple[list[int], list[int]]:
    """The query's tokens as generation sees them, and the reference's first REFERENCE_TOKENS tokens as they
    follow the query (tokenized together, unless that changes the query's own tokens)."""
    context = lm.tok_encode(query)
    whole = lm.tok_encode(query + reference)
    continuation = whole[len(context) :] if whole[: len(context)] == context else []
    continuation = (continuation or lm.tok_encode(reference, add_special_tokens=False))[:REFERENCE_TOKENS]
    if not continuation:
        raise ValueError(f"task {task_name!r} has a dev document with an empty target: nothing to score")
    return context, continuation


def _hits(examples: list[DevExample], scores: torch.Tensor, generation: bool) -> torch.Tensor:
    """Right or wrong per dev prompt, from fork_scores' per-row scores [..., rows, 2]: the first token for a
    generation, the choice with the highest log-likelihood otherwise."""
    if generation:
        return scores[..., 1] > 0
    hits, row = [], 0
    for ex in examples:
        k = len(ex.requests)
        hits.append(scores[..., row : row + k, 0].argmax(-1) == ex.gold)
        row += k
    return torch.stack(hits, -1)


def regular_and_thetas(
    lm: SweepModel, plans: list, fulls: list[tuple[list[int], list[int]]], layers: list[int], desc: str
) -> torch.Tensor:
    """Regular mode's per-row scores (as ``fork_scores``) of the full prompts ``fulls``, and θ at every listed
    block for each plan's key, with the demonstrations S run once for both: per θ key, the tokens its θ
    prompts [S, x'] share with its full prompts fill one KV cache, from which the dummies' suffixes give θ (one
    pass through the deepest block), and each full prompt's rest and continuation give regular's scores. Under
    a sliding window shorter than the prompts, nothing may widen or shift the window (no 4D mask, no padding
    or holes before a real token): one S, one context and one row per sequence."""
    rows_of: dict = {}
    for i, plan in enumerate(plans):
        rows_of.setdefault(plan.theta_key, []).append(i)
    families = {key: lm.thetas.prompts(key) for key in rows_of}
    keys = sorted(rows_of, key=lambda key: common_prefix_length(families[key]))  # similar S lengths share a batch
    widest = max(len(t) for tokens in [*families.values(), [c + t for c, t in fulls]] for t in tokens)
    windowed = not within_window(lm.model, widest)
    size, mask_kind = (1, None) if windowed else (lm.extract_batch_size, branch_mask_kind(lm.model))
    out = torch.empty(len(fulls), 2)
    for start in tqdm(range(0, len(keys), size), desc=desc, disable=lm.rank != 0):
        batch = keys[start : start + size]
        rows = [i for key in batch for i in rows_of[key]]
        contexts = list(dict.fromkeys((plans[i].theta_key, tuple(fulls[i][0])) for i in rows))
        which = [contexts.index((plans[i].theta_key, tuple(fulls[i][0]))) for i in rows]
        owner = [batch.index(key) for key, _ in contexts]
        cuts = [
            common_prefix_length([*(list(ctx) for k, ctx in contexts if k == key), *families[key]]) for key in batch
        ]
        cuts = cuts if min(cuts) > 0 else [0] * len(cuts)  # a prompt sharing nothing: no prefix for this batch
        with torch.no_grad(), lm.autocast():
            prefix = prefill(lm.model, [families[key][0][:cut] for key, cut in zip(batch, cuts)], lm.blocks[-1])
            members = [(b, prompt[cuts[b] :]) for b, key in enumerate(batch) for prompt in families[key]]
            found = _states_after_prefix(lm, prefix, members, layers)
            # Queries differ in length: contexts of similar length grow together, then their rows run.
            rest = [list(ctx[cuts[b] : -1]) for (_, ctx), b in zip(contexts, owner)]
            parts = (
                [[c] for c in range(len(contexts))]
                if windowed
                else length_chunks(range(len(contexts)), [len(r) for r in rest].__getitem__, SUFFIX_FLOOR)
            )
            for part in parts:
                grown = prefix.take([owner[c] for c in part])
                grown.grow(lm.model, [rest[c] for c in part], lm.blocks[-1])
                context_of = {i: part.index(c) for i, c in zip(rows, which) if c in part}
                units = _units(
                    list(context_of), fulls, [], [contexts[c][1][:-1] for c in part], context_of, mask_kind is not None
                )
                for chunk in length_chunks(units, lambda unit: _unit_length(unit, fulls)):
                    output, columns = grown.take([unit.context for unit in chunk]).extend_branches(
                        lm.model,
                        [unit.head for unit in chunk],
                        [[fulls[i][1][:-1] for i in unit.rows] for unit in chunk],
                        mask_kind,
                    )
                    for i, row_score in _unit_scores(output.logits, columns, chunk, fulls).items():
                        out[i] = row_score
        row = 0
        for key in batch:
            k = len(families[key])
            for layer in layers:  # θ: the mean over the dummies
                states = found[layer][row : row + k]
                lm.thetas.put(layer, key, states.float().mean(0).to(states.dtype))
            row += k
    return out


def _states_after_prefix(lm: SweepModel, prefix, members: list[tuple[int, list[int]]], layers: list[int]) -> dict:
    """``states_after`` for (prefix row, suffix) members, in chunks of similar suffix length (dummy queries
    differ in length, and a batch pads every suffix to its longest): {layer: Tensor[members, hidden]}."""
    found: dict = {}
    for part in length_chunks(range(len(members)), lambda m: len(members[m][1]), SUFFIX_FLOOR):
        states = states_after(
            lm.model, lm.blocks, prefix.take([members[m][0] for m in part]), [members[m][1] for m in part], layers
        )
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
    token is the argmax (from the head's last token, then from the columns of the row's branch). Computed where
    the logits are, moved to the CPU once per chunk."""
    found, order = [], []
    for u, unit in enumerate(chunk):
        first = logits[u, len(unit.head) - 1].float().log_softmax(-1)
        for own, i in zip(columns[u], unit.rows):
            cont = rows[i][1]
            rest = logits[u, own].float().log_softmax(-1)
            later = rest.gather(1, torch.tensor(cont[1:], dtype=torch.long, device=rest.device)[:, None]).sum()
            found.append(torch.stack([first[cont[0]] + later, (first.argmax() == cont[0]).float()]))
            order.append(i)
    return dict(zip(order, torch.stack(found).cpu())) if found else {}


def fork_scores(
    lm: SweepModel, rows: list[tuple[list[int], list[int]]], patches: list, desc: str | None = None
) -> torch.Tensor:
    """Score each row's continuation after its context, once per entry of ``patches`` (plans to patch at the
    context's last token, or None). Tensor[len(patches), rows, 2]: the continuation's summed log-probability,
    and whether its first token is the argmax. Distinct contexts minus their last token run once into a KV
    cache (ROW_CHUNK contexts at a time). Rows sharing a context and its plans (a question's choices) run as
    branches of one sequence (``_units``), so its last token runs once, and so do tokens the choices begin
    with alike; units run in chunks of similar length (``length_chunks``), each scored by ``_score_chunk``.
    Under a sliding window shorter than the rows, each context runs alone and each row as its own sequence."""
    out = torch.empty(len(patches), len(rows), 2)
    contexts = sorted(dict.fromkeys(tuple(ctx) for ctx, _ in rows), key=len)  # a group's prefill pads less
    index = {ctx: c for c, ctx in enumerate(contexts)}
    context_of = [index[tuple(ctx)] for ctx, _ in rows]
    windowed = not within_window(lm.model, max(len(ctx) + len(cont) for ctx, cont in rows))
    mask_kind, group_size = (None, 1) if windowed else (branch_mask_kind(lm.model), ROW_CHUNK)
    groups = []  # up to ROW_CHUNK distinct contexts share one KV cache
    for first in range(0, len(contexts), group_size):
        group = contexts[first : first + group_size]
        cached = [list(c[:-1]) for c in group] if min(map(len, group)) > 1 else [[] for _ in group]
        members = [i for i in range(len(rows)) if first <= context_of[i] < first + group_size]
        units = _units(members, rows, patches, cached, [c - first for c in context_of], mask_kind is not None)
        groups.append((cached, length_chunks(units, lambda unit: _unit_length(unit, rows))))
    bar = tqdm(
        total=sum(len(chunks) for _, chunks in groups) * len(patches), desc=desc, disable=desc is None or lm.rank != 0
    )
    replay = _Replay()
    for cached, chunks in groups:
        with torch.no_grad():
            context_cache = prefill(lm.model, cached, stop_block=lm.blocks[-1])
            for units in chunks:
                _score_chunk(_Chunk(lm, context_cache, units, rows, mask_kind), patches, replay, out, bar)
    bar.close()
    return out


@dataclass
class _Replay:
    """Whether replaying recorded block outputs reproduces a full pass: checked once per sweep."""

    checked: bool = False
    exact: bool = True


class _Chunk:
    """Units run from one context cache: a plain pass that records every block's output, then patched passes
    that replay the blocks below the patch from that record (``copies`` of the chunk in one pass)."""

    def __init__(self, lm: SweepModel, cache: Prefix, units: list[_Unit], rows, mask_kind: str | None):
        self.lm, self.cache, self.units, self.rows, self.mask_kind = lm, cache, units, rows, mask_kind
        self.heads = [unit.head for unit in units]
        self.branches = [[rows[i][1][:-1] for i in unit.rows] for unit in units]
        self.at = torch.tensor([len(head) - 1 for head in self.heads])
        self.recorded: list = []

    def forward(self, plans=(), replayed: int = 0, copies: int = 1):
        lm = self.lm
        with (
            lm.patched(list(plans), self.at.repeat(copies)) if plans else nullcontext(),
            replay_outputs(lm.blocks, self.recorded[:replayed], copies),
        ):
            return self.cache.take([unit.context for unit in self.units] * copies).extend_branches(
                lm.model, self.heads * copies, self.branches * copies, self.mask_kind
            )

    def run_recorded(self):
        with record_outputs(self.lm.blocks) as self.recorded:
            return self.forward()

    def write(self, out: torch.Tensor, patch: int, logits, columns) -> None:
        for i, row_score in _unit_scores(logits, columns, self.units, self.rows).items():
            out[patch, i] = row_score


def _score_chunk(chunk: _Chunk, patches: list, replay: _Replay, out: torch.Tensor, bar) -> None:
    """Every patch's scores of one chunk. Unpatched entries read the plain pass; a patch at block l replays
    blocks 0..l from it and runs only the blocks above l; patches at neighbouring blocks run as copies of the
    chunk in one pass (up to STACK_TOKENS tokens), replayed up to the lowest of them: a pass of a few dozen
    tokens runs far below the rate of a larger one."""
    plain = chunk.run_recorded()
    parts = [[unit.plans[p] for unit in chunk.units] if patches[p] else [] for p in range(len(patches))]
    lowest = [min((p.layer for p in part if p.theta_key is not None), default=None) for part in parts]
    patched = [p for p in range(len(parts)) if lowest[p] is not None]
    checked = _check_replay(chunk, parts, lowest, replay, out) if patched and not replay.checked else None
    for p in range(len(parts)):
        if lowest[p] is None:
            chunk.write(out, p, plain[0].logits, plain[1])
    bar.update(len(parts) - len(patched) + (checked is not None))
    todo = sorted((p for p in patched if p != checked), key=lambda p: lowest[p])
    size = max(1, STACK_TOKENS // (len(chunk.units) * _unit_length(chunk.units[0], chunk.rows)))
    for start in range(0, len(todo), size):
        stack = todo[start : start + size]
        output, columns = chunk.forward(
            [plan for p in stack for plan in parts[p]],
            min(lowest[p] for p in stack) + 1 if replay.exact else 0,
            len(stack),
        )
        for k, p in enumerate(stack):
            chunk.write(out, p, output.logits[k * len(chunk.units) : (k + 1) * len(chunk.units)], columns)
        bar.update(len(stack))


def _check_replay(chunk: _Chunk, parts: list, lowest: list, replay: _Replay, out: torch.Tensor) -> int:
    """Replaying assumes a block reads nothing but its inputs and its own KV cache: check it once against a
    full pass, on the longest units, at the patch that replays the most blocks but leaves one to run (at the
    last block there would be nothing left to show a difference). Returns the patch it scored."""
    lm = chunk.lm
    replay.checked = True
    checked = max(
        (p for p in range(len(parts)) if lowest[p] is not None),
        key=lambda p: (lowest[p] < len(lm.blocks) - 1, lowest[p]),
    )
    full = chunk.forward(parts[checked])
    replay.exact = torch.allclose(
        chunk.forward(parts[checked], lowest[checked] + 1)[0].logits, full[0].logits, rtol=1e-4, atol=1e-4
    )
    if not replay.exact:
        lm.warn_once(
            f"{type(lm.model).__name__}: a block's output depends on more than its inputs and its own KV "
            "cache, so the layer sweep runs every block for every patch (slower)"
        )
    chunk.write(out, checked, full[0].logits, full[1])
    return checked


def length_chunks(rows, length, floor: int = 0) -> list[list]:
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
