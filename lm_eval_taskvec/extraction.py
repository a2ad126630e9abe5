"""Block outputs at the last token of many prompts, computing each family's shared prefix once.

A family is the prompts [S, x'_1], ..., [S, x'_k] behind one task vector: they share S. The prefix runs once,
left-padded, into a KV cache that is repeated for the k members; then only the short suffixes run. Both
passes stop after the deepest block needed, so extraction at layer L never pays for the blocks above it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from lm_eval_taskvec.layers import read_last_states, stop_after


def _common_prefix_length(family: list[list[int]]) -> int:
    """Longest shared token prefix, leaving every member at least one token of its own."""
    shortest = min(len(tokens) for tokens in family)
    n = 0
    while n < shortest - 1 and all(tokens[n] == family[0][n] for tokens in family):
        n += 1
    return n


def _pad(rows: list[list[int]], width: int, left: bool) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, tokens in enumerate(rows):
        start = width - len(tokens) if left else 0
        out[r, start : start + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def _cache_argument(model: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_token_states(
    model: nn.Module,
    blocks: nn.ModuleList,
    families: list[list[list[int]]],
    layers: list[int],
    batch_size: int,
    progress: bool = True,
) -> torch.Tensor:
    """Tensor[len(layers), len(families), k, hidden]: each listed block's output at each prompt's last token."""
    k = len(families[0])
    if any(len(f) != k for f in families):
        raise ValueError("every family needs the same number of prompts")
    deepest = blocks[max(layers)]
    cache_arg = _cache_argument(model)
    device = next(model.parameters()).device
    out = None
    order = sorted(range(len(families)), key=lambda i: -max(map(len, families[i])))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="Extracting task vectors", disable=not progress or len(starts) < 2):
        batch = [families[i] for i in order[start : start + batch_size]]
        cut = [_common_prefix_length(f) for f in batch]
        if min(cut) == 0:
            raise ValueError("a prompt of one token has no prefix to share: extraction needs longer prompts")
        prefixes = [f[0][:c] for f, c in zip(batch, cut)]
        suffixes = [tokens[c:] for f, c in zip(batch, cut) for tokens in f]

        width = max(cut)
        mask = torch.tensor([[0] * (width - c) + [1] * c for c in cut], device=device)
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), stop_after(deepest):
            model(
                input_ids=_pad(prefixes, width, left=True).to(device),
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                **{cache_arg: cache},
            )
        cache.batch_repeat_interleave(k)

        span = max(map(len, suffixes))
        lengths = mask.sum(-1).repeat_interleave(k)
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        with torch.no_grad(), read_last_states(blocks, layers, last) as found, stop_after(deepest):
            model(
                input_ids=_pad(suffixes, span, left=False).to(device),
                # Right padding after each suffix is harmless: causal attention keeps it out of real tokens.
                attention_mask=torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(len(suffixes), span)], 1),
                position_ids=lengths[:, None] + torch.arange(span, device=device),
                use_cache=True,
                **{cache_arg: cache},
            )
        states = torch.stack([found[layer] for layer in layers]).unflatten(1, (len(batch), k))
        if out is None:
            out = states.new_empty(len(layers), len(families), k, states.shape[-1])
        out[:, order[start : start + batch_size]] = states
    return out
