"""Function vectors (Todd et al., ICLR 2024): one vector per task, the sum of its most causal attention heads'
mean outputs, added to a block's output at the query's last token.

On the task's dev prompts (those layer=auto and task_mean use; never a scored document): each head's mean
output at the last token of the clean prompts; then its average indirect effect (AIE), on the same prompts
with the demonstrations' targets shuffled among them: the gain in probability of the right answer's first
token when that head alone outputs its clean mean there, over the unpatched shuffled run. The FV is
Σ over the ``top_heads`` heads of highest AIE of the head's mean output times its slice of the attention
output projection (no bias). Each shuffled prompt runs once into a KV cache minus its last token; a block's
trial runs only that token, once per head as columns sharing the prompt's cache, from the patched block up
(the blocks below replay the unpatched pass). Ranking and vector are cached on disk like a layer choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import torch
from tqdm import tqdm

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.extraction import branch_mask_kind, prefill, within_window
from lm_eval_taskvec.heads import AttentionOutputs, find_attention_outputs, read_heads, write_heads
from lm_eval_taskvec.layers import record_outputs, replay_outputs
from lm_eval_taskvec.selection.cache import cache_key
from lm_eval_taskvec.selection.dev import DevSet
from lm_eval_taskvec.selection.interface import SweepModel
from lm_eval_taskvec.settings import read_method
from lm_eval_taskvec.theta import ThetaKey, shuffled_label_contexts

log = logging.getLogger("lm_eval.taskvec")

FV_VERSION = 1  # bump when the ranking or the vector changes meaning
RECORDED = ("top_heads", "num_prompts", "num_mean_prompts", "num_aie_prompts", "dev_split")  # what results show


def ensure(lm: SweepModel, task_name: str, sets: list[DevSet]) -> tuple[ThetaKey, dict]:
    """The key of ``task_name``'s function vector, put in ``lm.thetas`` at every block, and its record (top
    heads with their AIE, prompts, source): from memory, the disk cache, or computed now."""
    outputs = find_attention_outputs(lm.model, lm.blocks, lm.settings.attn_out_path, lm.settings.top_heads)
    settings = replace(lm.settings, **read_method("function_vector"))  # op and scale do not change the FV
    base = cache_key(lm.model, lm.revision, len(lm.blocks), settings, task_name, sets, None, lm.rank == 0)
    key = hashlib.sha256(json.dumps([base, "function_vector", FV_VERSION]).encode()).hexdigest()[:24]
    hidden = outputs.weight_slice(0, 0).shape[0]
    record = lm.choice_cache.remembered(key) or lm.choice_cache.read_or_sweep(
        key,
        len(lm.blocks),
        lambda: compute(lm, task_name, sets, outputs),
        lambda entry: valid_record(entry, len(lm.blocks), outputs.num_heads, lm.settings.top_heads, hidden),
    )
    theta_key = ThetaKey("", (), False, function_vector=key)
    if (0, theta_key) not in lm.thetas:
        weight = outputs.projections[0].weight
        vector = torch.tensor(record["vector"], dtype=torch.float32).to(weight.device, lm.model.dtype)
        for layer in range(len(lm.blocks)):
            lm.thetas.put(layer, theta_key, vector)
    return theta_key, record


def compute(lm: SweepModel, task_name: str, sets: list[DevSet], outputs: AttentionOutputs) -> dict:
    """Head means, AIE and the vector of ``task_name``, from its dev prompts and their shuffled-label twins."""
    task = LOADED_TASKS[task_name]
    if task.multiple_input:
        raise ValueError(
            f"task {task_name!r} renders one context per choice, so its prompts have no one last token to rank "
            "heads at: use another method for it (e.g. method=task_mean)"
        )
    examples = [ex for dev in sets for ex in dev.examples]
    shots, pairs = task.get_config("num_fewshot"), []
    for dev in sets:
        pairs += shuffled_label_contexts(task, [(ex.doc_id, ex.doc) for ex in dev.examples], shots, lm.settings.seed)
    rows = []  # (clean tokens, shuffled tokens, the right answer's first token)
    for (clean, shuffled), ex in zip(pairs, examples):
        if clean != ex.requests[0].args[0]:
            raise RuntimeError(f"task {task_name!r}: a dev prompt rendered again differs from the one swept")
        if task.get_config("output_type") == "generate_until":
            target = lm.tok_encode(ex.gold, add_special_tokens=False)[:1]
            tokens = [lm.tok_encode(text)[-lm.max_length + 1 :] for text in (clean, shuffled)]
        else:
            continuation = ex.requests[ex.gold].args[1]
            (clean_ids, target), (shuffled_ids, _) = (lm.encode_pair(t, continuation) for t in (clean, shuffled))
            tokens, target = [clean_ids, shuffled_ids], target[:1]
        if not target:
            raise ValueError(f"task {task_name!r} has a dev document with an empty target: nothing to rank heads by")
        rows.append((*tokens, target[0]))
    num_blocks, settings = len(lm.blocks), lm.settings
    num_mean, num_aie = (
        _count(name, n, len(rows), task_name)
        for name, n in (("num_mean_prompts", settings.num_mean_prompts), ("num_aie_prompts", settings.num_aie_prompts))
    )
    log.info(
        "%s: function vector: mean outputs of %d heads over %d dev prompts, then each head's AIE on %d with "
        "shuffled labels (per prompt, %d last-token trials, one per block, each holding the token once per head)",
        task_name,
        outputs.count,
        num_mean,
        num_aie,
        num_blocks,
    )
    means = mean_head_outputs(lm, outputs, [clean for clean, _, _ in rows[:num_mean]])
    trials = [(shuffled, target) for _, shuffled, target in rows[:num_aie]]
    effects = indirect_effects(lm, outputs, means, trials, task_name)
    ranked = sorted(
        (
            (effects[layer, head].item(), layer, head)
            for layer in range(num_blocks)
            for head in range(outputs.num_heads)
        ),
        key=lambda entry: (-entry[0], entry[1], entry[2]),
    )[: lm.settings.top_heads]
    with torch.no_grad():
        vector = sum(
            (
                outputs.weight_slice(layer, head).float()
                @ means[layer][head].to(outputs.weight_slice(layer, head).device)
            ).cpu()
            for _, layer, head in ranked
        )
    top = [{"layer": layer, "head": head, "aie": round(aie, 6)} for aie, layer, head in ranked]
    log.info("%s: function vector from heads %s", task_name, ", ".join(f"{t['layer']}.{t['head']}" for t in top))
    return {
        "task": task_name,
        "top_heads": top,
        "vector": vector.tolist(),
        "num_prompts": len(rows),
        "num_mean_prompts": num_mean,
        "num_aie_prompts": num_aie,
        "dev_split": sets[0].split,
    }


def _count(name: str, given: int | None, available: int, task_name: str) -> int:
    """The first ``given`` of the task's dev prompts (None: all of them)."""
    if given is None:
        return available
    if given > available:
        raise ValueError(
            f"{name}={given} is more than the {available} dev prompts of task {task_name!r}: lower it, or raise "
            "num_dev (dev prompts per task)"
        )
    return given


def mean_head_outputs(lm: SweepModel, outputs: AttentionOutputs, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per block, each head's output at the last token averaged over ``prompts``: Tensor[heads, head_dim] in
    float32 (on the block's device)."""
    size = lm.extract_batch_size if within_window(lm.model, max(map(len, prompts))) else 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # a batch pads less
    sums: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), size):
        batch = [prompts[i] for i in order[start : start + size]]
        with torch.no_grad(), lm.autocast(), read_heads(outputs) as found:
            prefill(lm.model, batch, stop_block=lm.blocks[-1])
        for layer, heads in found.items():
            sums[layer] = sums[layer] + heads.float().sum(0) if layer in sums else heads.float().sum(0)
    return [sums[layer] / len(prompts) for layer in range(len(lm.blocks))]


def indirect_effects(
    lm: SweepModel,
    outputs: AttentionOutputs,
    means: list[torch.Tensor],
    rows: list[tuple[list[int], int]],
    task_name: str = "",
) -> torch.Tensor:
    """Each head's average gain in the probability of its row's target token (``rows``: corrupted prompt
    tokens, target) when it outputs its mean at the last token: Tensor[blocks, heads]. Prompts run in groups;
    a group's prompts minus their last token fill one KV cache, and each block's trial is one pass of the last
    token, once per head as columns of its row (see ``_Trials``), replaying the blocks below the patched one."""
    num_blocks, num_heads = len(lm.blocks), outputs.num_heads
    windowed = not within_window(lm.model, max(len(tokens) for tokens, _ in rows) + num_heads)
    mask_kind = None if windowed else branch_mask_kind(lm.model)
    group = 1 if windowed else lm.extract_batch_size
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # a group pads less
    effects, exact = torch.zeros(num_blocks, num_heads), None
    bar = tqdm(
        total=len(rows), desc=f"{task_name}: function vector, head effects", disable=lm.rank != 0 or not task_name
    )
    for start in range(0, len(order), group):
        trials = _Trials(lm, outputs, means, [rows[i] for i in order[start : start + group]], mask_kind)
        last = num_blocks - 1
        if exact is None and num_blocks > 1:  # replaying is exact if a block reads only its inputs and cache
            exact = torch.allclose(trials.gain(last, last), trials.gain(last, 0), atol=1e-5)
            if not exact:
                lm.warn_once(
                    f"{type(lm.model).__name__}: a block's output depends on more than its inputs and its own "
                    "KV cache, so function vectors' head trials run every block (slower)"
                )
        for layer in range(num_blocks):
            effects[layer] += trials.gain(layer, layer if exact else 0).sum(-1)
        bar.update(len(trials.part))
    bar.close()
    return effects / len(rows)


class _Trials:
    """One group of corrupted prompts: their KV cache minus the last token and the unpatched last-token pass
    (recorded block by block), from which each block's head trials run: under a 4D mask (``mask_kind``), one
    pass whose row holds the last token once per head, as columns sharing the row's cache (memory O(rows ×
    sequence) + rows × heads tokens); without one, a pass per head."""

    def __init__(self, lm: SweepModel, outputs: AttentionOutputs, means, part: list, mask_kind: str | None):
        self.lm, self.outputs, self.means, self.part, self.mask_kind = lm, outputs, means, part, mask_kind
        self.targets = torch.tensor([target for _, target in part])
        self.last = [tokens[-1] for tokens, _ in part]
        with torch.no_grad(), lm.autocast():
            self.prefix = prefill(lm.model, [tokens[:-1] for tokens, _ in part], stop_block=lm.blocks[-1])
            with record_outputs(lm.blocks) as self.recorded:
                plain = self._take().extend(lm.model, [[token] for token in self.last])
        self.base = _probability(plain.logits, self.targets)[:, 0]

    def _take(self):
        return self.prefix.take(list(range(len(self.part))))

    def gain(self, layer: int, replayed: int) -> torch.Tensor:
        """Tensor[heads, prompts]: the target's probability with head h of ``layer`` at its mean, minus the
        unpatched one; blocks 0..replayed-1 replay the unpatched pass."""
        lm, num_heads = self.lm, self.outputs.num_heads
        passes = [list(range(num_heads))] if self.mask_kind else [[h] for h in range(num_heads)]
        found = []
        for heads in passes:
            values = self.means[layer][torch.tensor(heads, device=self.means[layer].device)]
            with (
                torch.no_grad(),
                lm.autocast(),
                write_heads(self.outputs, layer, heads, values),
                replay_outputs(lm.blocks, self.recorded[:replayed], columns=len(heads)),
            ):
                if self.mask_kind:
                    logits = self._take().extend_columns(lm.model, self.last, len(heads), self.mask_kind).logits
                else:
                    logits = self._take().extend(lm.model, [[token] for token in self.last]).logits
            found.append(_probability(logits, self.targets))
        return torch.cat(found, 1).T - self.base


def _probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Tensor[rows, columns]: each row's probability of its target at each of its columns, on the CPU."""
    probs = logits.float().softmax(-1)
    return probs.gather(2, targets.to(probs.device)[:, None, None].expand(-1, probs.shape[1], 1))[..., 0].cpu()


def valid_record(entry: dict, num_blocks: int, num_heads: int, top_heads: int, hidden: int) -> bool:
    """A cached function vector for this model: its vector, and ``top_heads`` heads within the model."""

    def head(item) -> bool:
        return (
            isinstance(item, dict)
            and type(item.get("layer")) is int
            and 0 <= item["layer"] < num_blocks
            and type(item.get("head")) is int
            and 0 <= item["head"] < num_heads
            and type(item.get("aie")) in (int, float)
        )

    vector, top = entry.get("vector"), entry.get("top_heads")
    return (
        isinstance(vector, list)
        and len(vector) == hidden
        and all(type(v) in (int, float) for v in vector)
        and isinstance(top, list)
        and len(top) == top_heads
        and all(map(head, top))
        and type(entry.get("num_prompts")) is int
        and isinstance(entry.get("dev_split"), str)
    )
