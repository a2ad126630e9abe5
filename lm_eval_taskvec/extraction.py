"""Batched forward passes that compute a shared prefix once and reuse its KV cache.

Extraction: a family is the prompts [S, x'_1], ..., [S, x'_k] behind one task vector; they share S. S runs
once and the members' short suffixes run as branches after it, kept apart by a 4D attention mask, in one pass
(or, for a model that takes no such mask, S into a KV cache repeated for the k members, then the suffixes).
Passes stop after the deepest block needed, so extraction at layer L never pays for blocks above. The layer
sweep reuses a cache the same way: the query minus its last token once, then the last token per layer.
"""

from __future__ import annotations

import copy
import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from lm_eval_taskvec.layers import read_last_states, stop_after

log = logging.getLogger("lm_eval.taskvec")


@dataclass
class Prefix:
    cache: DynamicCache
    mask: torch.Tensor  # [batch, width], left-padded

    def extend(self, model: nn.Module, suffixes: list[list[int]], repeat: int = 1):
        """Run ``suffixes`` (``repeat`` per prefix row, in order) after the cached prefix; mutates the cache."""
        if repeat > 1:
            self.cache.batch_repeat_interleave(repeat)
            self.mask = self.mask.repeat_interleave(repeat, 0)
        span = max(map(len, suffixes))
        lengths = self.mask.sum(-1)
        return model(
            input_ids=_pad(suffixes, span, left=False).to(self.mask.device),
            # Right padding after each suffix is harmless: causal attention keeps it out of real tokens.
            attention_mask=torch.cat([self.mask, self.mask.new_ones(len(suffixes), span)], 1),
            position_ids=lengths[:, None] + torch.arange(span, device=self.mask.device),
            use_cache=True,
            **{cache_argument(model): self.cache},
        )

    def extend_branches(
        self, model: nn.Module, heads: list[list[int]], branches: list[list[list[int]]], mask_kind: str | None
    ):
        """Run after each prefix row its ``heads`` tokens, then each of its ``branches`` as if it alone followed
        the head: one sequence per row, kept apart by a 4D attention mask (``mask_kind`` "bool" or "additive",
        see ``branch_mask_kind``), so that the rows of one context share its KV cache and its head's pass.
        Branches that begin alike share those tokens (a trie: a question's choices often start with the same
        word). Without a mask kind, every row has one branch and a plain 2D mask. Returns the model output and,
        per row and branch, the columns of the branch's tokens; mutates the cache."""
        if mask_kind is None and any(len(b) > 1 for b in branches):
            raise ValueError("several branches per row need a 4D mask kind")
        layouts = [_trie(head, row_branches) for head, row_branches in zip(heads, branches)]
        width, rows = max(len(tokens) for tokens, _, _, _ in layouts), len(heads)
        ids = torch.zeros(rows, width, dtype=torch.long)
        offset = torch.arange(width).repeat(rows, 1)  # position after the prefix; padding counts on
        sees = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)  # new token i attends to new token j
        for r, (tokens, parents, depths, _) in enumerate(layouts):
            ids[r, : len(tokens)], offset[r, : len(tokens)] = (
                torch.tensor(tokens, dtype=torch.long),
                torch.tensor(depths),
            )
            for column, parent in enumerate(parents):
                if parent >= 0:
                    sees[r, column] |= sees[r, parent]  # a token sees its ancestors, itself, and the prefix
        device = self.mask.device
        if mask_kind is None:
            mask = torch.cat([self.mask, self.mask.new_ones(rows, width)], 1)
        else:
            mask = torch.cat([self.mask.bool()[:, None, :].expand(rows, width, -1), sees.to(device)], 2)[:, None]
            if mask_kind == "additive":
                dtype = model.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        output = model(
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=self.mask.sum(-1)[:, None] + offset.to(device),
            use_cache=True,
            **{cache_argument(model): self.cache},
        )
        return output, [columns for _, _, _, columns in layouts]

    def extend_columns(self, model: nn.Module, tokens: list[int], copies: int, mask_kind: str):
        """Run row i's one token ``tokens[i]`` ``copies`` times after the cached prefix, as columns at the same
        position that see the prefix and themselves only (a 4D mask of ``mask_kind``, see ``branch_mask_kind``):
        one KV cache per row serves all copies, e.g. one per attention head patched. Mutates the cache."""
        rows, device = len(tokens), self.mask.device
        sees = torch.eye(copies, dtype=torch.bool, device=device).repeat(rows, 1, 1)
        mask = torch.cat([self.mask.bool()[:, None, :].expand(rows, copies, -1), sees], 2)[:, None]
        if mask_kind == "additive":
            dtype = model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return model(
            input_ids=torch.tensor(tokens, device=device)[:, None].repeat(1, copies),
            attention_mask=mask,
            position_ids=self.mask.sum(-1)[:, None].repeat(1, copies),
            use_cache=True,
            **{cache_argument(model): self.cache},
        )

    def grow(self, model: nn.Module, suffixes: list[list[int]], stop_block: nn.Module) -> None:
        """Append ``suffixes`` (one per row, any lengths, empty allowed) to the cache, through ``stop_block``;
        shorter ones leave masked holes, which later positions (counted from the mask) skip."""
        span = max(map(len, suffixes))
        if span == 0:
            return
        with stop_after(stop_block):
            self.extend(model, suffixes)
        real = torch.tensor([[1] * len(s) + [0] * (span - len(s)) for s in suffixes], device=self.mask.device)
        self.mask = torch.cat([self.mask, real.to(self.mask.dtype)], 1)

    def take(self, rows: list[int]) -> "Prefix":
        """A copy holding the given prefix rows (repeats allowed), e.g. one per choice of a question. Only the
        selected rows are copied: the cache's containers are copied, its tensors re-indexed, never cloned whole."""
        cache = copy.copy(self.cache)
        if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
            cache.layers = [copy.copy(layer) for layer in cache.layers]
        else:
            cache.key_cache, cache.value_cache = list(cache.key_cache), list(cache.value_cache)
        # A CPU index serves every layer's device (a model spread over GPUs keeps each layer's cache on its own).
        cache.batch_select_indices(torch.tensor(rows))  # rebinds each layer's tensors to new ones, the original's stay
        return Prefix(cache, self.mask[torch.tensor(rows, device=self.mask.device)])


def input_device(model: nn.Module) -> torch.device:
    """Where a forward pass's token ids go: the input embedding's execution device. Under accelerate's offload
    (``parallelize=True``) the weights may sit on ``meta`` or the CPU while the embedding runs elsewhere, so
    neither the first parameter's device nor the embedding weight's says it."""
    embedding = model.get_input_embeddings()
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if device is None:
        return embedding.weight.device
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def prefill(model: nn.Module, prefixes: list[list[int]], stop_block: nn.Module | None = None) -> Prefix:
    """Run left-padded ``prefixes`` into a fresh KV cache, filling only blocks up to ``stop_block`` if given.

    Prefixes are all empty (then nothing runs) or all non-empty: a row of padding only has nothing to attend to.
    """
    device = input_device(model)
    width = max(map(len, prefixes))
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device, dtype=torch.long)
    if width and min(map(len, prefixes)) == 0:
        raise ValueError("prefixes must be all empty or all non-empty")
    return prefill_columns(model, _pad(prefixes, width, left=True).to(device), mask, stop_block)


def prefill_columns(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, stop_block: nn.Module | None = None):
    """Run the left-padded columns ``input_ids`` into a fresh KV cache, exactly as ``generate`` would."""
    prefix = Prefix(DynamicCache(config=model.config), mask)
    if input_ids.shape[1] == 0:
        return prefix
    with stop_after(stop_block) if stop_block is not None else nullcontext():
        model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{cache_argument(model): prefix.cache},
        )
    return prefix


def branch_mask_kind(model: nn.Module) -> str | None:
    """How ``model`` takes the 4D attention mask of ``Prefix.extend_branches``: "bool" under SDPA, "additive"
    under eager attention, None otherwise (flash attention takes no custom mask) or when the check fails; said
    once in the log. The check, once per model: a small input run as branches gives the logits of each branch
    run on its own in one plain pass, within 1e-4 in float32 or as closely as the branch's own rows continued
    from a plain KV cache do (what runs without the mask): rounding differs with the shapes of a pass (Gemma 3
    in float32: 2e-4 branched, 5e-4 cached; SmolLM2 in float16 under SDPA: 0.074 both), a misread mask does not."""
    if hasattr(model, "_taskvec_branch_mask"):
        return model._taskvec_branch_mask
    attention = getattr(model.config, "_attn_implementation", None)
    kind = {"sdpa": "bool", "eager": "additive"}.get(attention)
    if kind is None:
        log.info(
            "%s runs %s attention, which takes no custom 4D mask: extraction and the layer sweep run one row "
            "per sequence (slower)",
            type(model).__name__,
            attention,
        )
    else:
        branched, cached = _branch_check(model, kind)
        slack = max(1e-4 if model.dtype == torch.float32 else 0.0, cached) + 4 * torch.finfo(model.dtype).eps
        if branched > slack:
            log.warning(
                "%s (%s, %s attention): branches under a 4D mask give logits %.3g away from one pass per "
                "row (a plain KV-cached pass: %.3g): extraction and the layer sweep run one row per sequence "
                "(slower)",
                type(model).__name__,
                str(model.dtype).removeprefix("torch."),
                attention,
                branched,
                cached,
            )
            kind = None
    model._taskvec_branch_mask = kind
    return kind


def _branch_check(model: nn.Module, kind: str) -> tuple[float, float]:
    """The largest logit difference from one plain pass per row: of rows run as branches under the 4D mask,
    and of the same rows continued from a KV cache of their prefix (no custom mask)."""
    vocab = model.get_input_embeddings().num_embeddings
    tokens = [(7 * i + 3) % vocab for i in range(12)]
    prefixes, heads = [tokens[:3], tokens[3:4]], [tokens[4:5], tokens[5:7]]
    branches = [[tokens[7:9], tokens[9:10], tokens[7:8] + tokens[10:11]], [tokens[10:12]]]  # two share a token
    branched = cached = 0.0
    with torch.no_grad():
        output, columns_of = prefill(model, prefixes).extend_branches(model, heads, branches, kind)
        for r, (prefix, head) in enumerate(zip(prefixes, heads)):
            for own, branch in zip(columns_of[r], branches[r]):
                alone = model(input_ids=torch.tensor([prefix + head + branch], device=input_device(model)))
                expected = alone.logits[0, len(prefix) :].float()
                continued = prefill(model, [prefix]).extend(model, [head + branch]).logits[0].float()
                columns = list(range(len(head))) + own
                branched = max(branched, (output.logits[r, columns].float() - expected).abs().max().item())
                cached = max(cached, (continued - expected).abs().max().item())
    return branched, cached


def last_token_states(
    model: nn.Module,
    blocks: nn.ModuleList,
    families: list[list[list[int]]],
    layers: list[int],
    batch_size: int,
    progress: bool = True,
    desc: str = "Extracting task vectors",
) -> torch.Tensor:
    """Tensor[len(layers), len(families), k, hidden]: each listed block's output at each prompt's last token.
    Under a sliding window shorter than the prompts, no 4D mask (it would widen the window): S into a KV cache,
    left-padded (transformers' window masks count positions, so padding does not move it), then the suffixes."""
    k = len(families[0])
    if any(len(f) != k for f in families):
        raise ValueError("every family needs the same number of prompts")
    longest = max(len(tokens) for family in families for tokens in family)
    mask_kind = branch_mask_kind(model) if within_window(model, longest) else None
    out = None
    order = sorted(range(len(families)), key=lambda i: -max(map(len, families[i])))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2):
        batch = [families[i] for i in order[start : start + batch_size]]
        cut = [common_prefix_length(f) for f in batch]
        with torch.no_grad():
            if mask_kind is not None:
                found = _family_states(model, blocks, batch, cut, layers, mask_kind)
            else:  # S into a KV cache repeated per member, then the suffixes: two passes
                cut = cut if min(cut) > 0 else [0] * len(cut)  # a family sharing nothing: no prefix for this batch
                prefix = prefill(model, [f[0][:c] for f, c in zip(batch, cut)], stop_block=blocks[max(layers)])
                suffixes = [tokens[c:] for f, c in zip(batch, cut) for tokens in f]
                found = states_after(model, blocks, prefix, suffixes, layers, repeat=k)
        states = torch.stack([found[layer] for layer in layers]).reshape(len(layers), len(batch), k, -1)
        if out is None:
            out = states.new_empty(len(layers), len(families), k, states.shape[-1])
        out[:, order[start : start + batch_size]] = states
    return out


def _family_states(model, blocks, batch, cut, layers, mask_kind) -> dict[int, torch.Tensor]:
    """One pass per batch: each family's shared prefix S once, its members' suffixes as branches after it
    (``Prefix.extend_branches`` from an empty cache). {layer: Tensor[families, k, hidden]}."""
    heads = [family[0][:c] for family, c in zip(batch, cut)]
    branches = [[tokens[c:] for tokens in family] for family, c in zip(batch, cut)]
    last = torch.tensor([[columns[-1] for columns in _trie(h, b)[3]] for h, b in zip(heads, branches)])
    with read_last_states(blocks, layers, last) as found, stop_after(blocks[max(layers)]):
        prefill(model, [[] for _ in batch]).extend_branches(model, heads, branches, mask_kind)
    return found


def within_window(model: nn.Module, width: int) -> bool:
    """Whether every attention layer of ``model`` sees all of ``width`` positions. A sliding window would be
    moved by a custom 4D mask or by masked holes in the cache, so those passes run only within it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = (
        getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) is not False else None
    )
    return not window or width <= window


def states_after(
    model: nn.Module,
    blocks: nn.ModuleList,
    prefix: Prefix,
    suffixes: list[list[int]],
    layers: list[int],
    repeat: int = 1,
) -> dict[int, torch.Tensor]:
    """Run ``suffixes`` after ``prefix`` (``repeat`` per prefix row) only up to the deepest listed block, and
    return each listed block's output at each suffix's last token: {layer: Tensor[rows, hidden]}."""
    last = torch.tensor([len(s) - 1 for s in suffixes])
    with read_last_states(blocks, layers, last) as found, stop_after(blocks[max(layers)]):
        prefix.extend(model, suffixes, repeat=repeat)
    return found


def common_prefix_length(family: list[list[int]]) -> int:
    """Longest shared token prefix, leaving every member at least one token of its own."""
    shortest = min(len(tokens) for tokens in family)
    n = 0
    while n < shortest - 1 and all(tokens[n] == family[0][n] for tokens in family):
        n += 1
    return n


def _trie(head: list[int], branches: list[list[int]]):
    """One sequence: ``head`` as a chain, then ``branches`` as a trie hanging from its last token. Returns its
    tokens, each token's parent column (-1: none), its depth (position after the prefix), and per branch the
    columns of its tokens."""
    tokens, parents, depths = list(head), list(range(-1, len(head) - 1)), list(range(len(head)))
    node: dict[tuple[int, ...], int] = {}
    columns = []
    for branch in branches:
        path = []
        for k in range(len(branch)):
            key = tuple(branch[: k + 1])
            if key not in node:
                node[key] = len(tokens)
                tokens.append(branch[k])
                parents.append(path[-1] if path else len(head) - 1)
                depths.append(len(head) + k)
            path.append(node[key])
        columns.append(path)
    return tokens, parents, depths, columns


def _pad(rows: list[list[int]], width: int, left: bool) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, tokens in enumerate(rows):
        start = width - len(tokens) if left else 0
        out[r, start : start + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def cache_argument(model: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40): the name the model's
    class takes, whatever wraps the instance's ``forward`` (accelerate's hooks, a test's spy)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
