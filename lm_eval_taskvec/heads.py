"""Attention heads for function vectors: each block's attention output projection, found without
per-architecture tables, and the hooks that read or write one head's slice of its input.

A head's output is the slice of the projection's *input* that belongs to it (heads are concatenated there,
as every Hugging Face decoder concatenates them); its contribution to the residual stream is that slice
times the matching columns of the projection's weight. The projection is the last linear layer
(``nn.Linear``, or GPT-2's ``Conv1D``) of the block's one attention submodule, and must map num_heads ×
head_dim features to the hidden size (q_proj often has that shape too; the last one runs after attention):
``o_proj`` (Llama, Mistral, Qwen2, Gemma), ``dense`` (GPT-NeoX), ``out_proj`` (GPT-J), ``c_proj`` (GPT-2).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

OVERRIDE = "attn_out_path=<path from a block to its attention output projection, e.g. self_attn.o_proj>"


@dataclass(frozen=True)
class AttentionOutputs:
    """Each block's attention output projection, and how its input splits into heads."""

    projections: list[nn.Module]
    num_heads: int
    head_dim: int

    @property
    def count(self) -> int:
        return len(self.projections) * self.num_heads

    def weight_slice(self, layer: int, head: int) -> torch.Tensor:
        """W_h, Tensor[hidden, head_dim]: the projection's output is Σ_h x_h @ W_h^T (+ its bias)."""
        proj, d = self.projections[layer], self.head_dim
        if isinstance(proj, Conv1D):  # out = x @ W + b, W: [in, out]
            return proj.weight[head * d : (head + 1) * d, :].T
        return proj.weight[:, head * d : (head + 1) * d]


def _in_out(module: nn.Module, named: bool = False) -> tuple[int, int] | None:
    """(in, out) features of a linear layer; a module named by ``attn_out_path`` may be any with a 2-D
    ``weight`` [out, in] (applied as x @ weight^T + bias)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or (named and isinstance(weight, torch.Tensor) and weight.dim() == 2):
        return weight.shape[1], weight.shape[0]
    return None


def _head_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_heads, head_dim, hidden) from the model's config."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    heads = next(
        (getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k)), None
    )
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k)), None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        raise ValueError(
            f"{type(model).__name__}'s config names no number of attention heads and hidden size "
            "(num_attention_heads / n_head, hidden_size / n_embd): function vectors need both"
        )
    head_dim = getattr(config, "head_dim", None)
    return heads, head_dim if isinstance(head_dim, int) else hidden // heads, hidden


def find_attention_outputs(
    model: nn.Module, blocks: nn.ModuleList, path: str | None = None, top_heads: int | None = None
) -> AttentionOutputs:
    """The attention output projection of every block (``path``, relative to a block, overrides discovery);
    refuses ``top_heads`` beyond the model's heads."""
    heads, head_dim, hidden = _head_shape(model)
    width = heads * head_dim
    found = []
    for index, block in enumerate(blocks):
        if path:
            try:
                proj = block.get_submodule(path)
            except AttributeError as err:
                raise ValueError(f"attn_out_path={path!r} names no submodule of block {index}") from err
            if _in_out(proj, named=True) != (width, hidden):
                raise ValueError(
                    f"attn_out_path={path!r} is a {type(proj).__name__}, not a linear layer from "
                    f"num_heads × head_dim = {width} features to the hidden size {hidden}"
                )
        else:
            attention = [  # the child named for attention that holds linear layers (not post_attention_layernorm)
                [m for m in child.modules() if _in_out(m) is not None]
                for name, child in block.named_children()
                if "attn" in name.lower() or "attention" in name.lower()
            ]
            attention = [linear for linear in attention if linear]
            linear = attention[0] if len(attention) == 1 else []
            if not linear or _in_out(linear[-1]) != (width, hidden):
                raise ValueError(
                    f"could not find the attention output projection of {type(block).__name__} (a linear layer from "
                    f"{heads} heads × {head_dim} = {width} features to {hidden}, in its attention): pass {OVERRIDE}"
                )
            proj = linear[-1]  # q, k and v come first: the last one is the only one applied after attention
        found.append(proj)
    outputs = AttentionOutputs(found, heads, head_dim)
    if top_heads is not None and top_heads > outputs.count:
        raise ValueError(
            f"top_heads={top_heads} is more than the {outputs.count} attention heads of {type(model).__name__} "
            f"({len(blocks)} blocks × {heads}): use top_heads=1..{outputs.count}"
        )
    return outputs


def _input(args, outputs: AttentionOutputs) -> torch.Tensor:
    width = outputs.num_heads * outputs.head_dim
    if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[-1] != width:
        raise RuntimeError(
            f"the attention output projection did not receive [.., {width}] features as its first argument, "
            f"so its input cannot be read as {outputs.num_heads} heads: pass {OVERRIDE}"
        )
    return args[0]


@contextmanager
def read_heads(outputs: AttentionOutputs):
    """Every block's head outputs at the last position of one forward pass: yields {layer: Tensor[batch,
    heads, head_dim]}, filled as the pass runs (the last column only: memory O(batch × heads × head_dim))."""
    found: dict[int, torch.Tensor] = {}

    def make_hook(layer):
        def hook(module, args):
            x = _input(args, outputs)
            found[layer] = x[:, -1].detach().reshape(x.shape[0], outputs.num_heads, outputs.head_dim)

        return hook

    with ExitStack() as hooks:
        for i, projection in enumerate(outputs.projections):
            hooks.enter_context(projection.register_forward_pre_hook(make_hook(i)))
        yield found


@contextmanager
def write_heads(outputs: AttentionOutputs, layer: int, heads: list[int], values: torch.Tensor):
    """In every row, column j of the last ``len(heads)`` columns: head ``heads[j]`` of block ``layer`` outputs
    ``values[j]`` (Tensor[len(heads), head_dim]) in place of its own; the hook must fire exactly once."""
    calls = []
    d, n = outputs.head_dim, len(heads)

    def hook(module, args):
        x = _input(args, outputs).clone()
        if x.shape[1] < n:
            raise RuntimeError(f"head patch expected {n} columns but the projection ran on {x.shape[1]}")
        index = torch.tensor(heads, device=x.device)[:, None] * d + torch.arange(d, device=x.device)
        columns = torch.arange(x.shape[1] - n, x.shape[1], device=x.device)[:, None]
        x[:, columns, index] = values.to(x.device, x.dtype)
        calls.append(1)
        return (x, *args[1:])

    with outputs.projections[layer].register_forward_pre_hook(hook):
        yield
    if len(calls) != 1:
        raise RuntimeError(f"a head patch fired {len(calls)} times, expected once")
