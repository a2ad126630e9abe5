"""Layer discovery and the only hooks of the project: read a block's output, write into it (an ``Intervention``:
a vector at one position of one row, replaced or added), or replay it.

Blocks are found without per-architecture tables: the decoder blocks are the largest ``nn.ModuleList`` of
identical modules. Block outputs may be a Tensor (transformers >= 5) or a tuple whose first item is the
hidden state (older versions); both are handled, anything else raises instead of silently doing nothing.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lm_eval_taskvec.settings import OPS


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model``; ``path`` (e.g. ``"model.layers"``) overrides discovery."""
    if path:
        try:
            blocks = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"layers_path={path!r} names no submodule of {type(model).__name__}") from err
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"layers_path={path!r} is a {type(blocks).__name__}, not a non-empty ModuleList")
        return blocks

    def size(module):
        return sum(p.numel() for p in module.parameters())

    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
    ]
    expected = _configured_depth(model)
    if expected:
        candidates = [m for m in candidates if len(m) == expected] or candidates
    if not candidates:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: "
            "pass layers_path=<dotted path to its ModuleList of blocks>, e.g. layers_path=model.layers"
        )
    return max(candidates, key=size)


def _configured_depth(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def resolve_layer(layer: int | float, num_blocks: int) -> int:
    """Block index from an int (negative counts from the end) or a fraction of depth in (0, 1)."""
    if isinstance(layer, float) and not layer.is_integer():
        if not 0.0 < layer < 1.0:
            raise ValueError(f"layer={layer} is neither a block index nor a fraction of depth in (0, 1)")
        return int(layer * num_blocks)  # < num_blocks, as layer < 1
    index = int(layer)
    if not -num_blocks <= index < num_blocks:
        raise ValueError(
            f"layer={index} is out of range for a model with {num_blocks} blocks: "
            f"use 0..{num_blocks - 1}, -{num_blocks}..-1, or a fraction such as 0.6"
        )
    return index % num_blocks


def _hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unsupported block output {type(output).__name__}: expected a Tensor or a tuple")


def _with_hidden(output, hidden: torch.Tensor):
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


class _StopForward(Exception):
    """Raised once the deepest block a pass needs has run, to skip the rest of the model."""


@contextmanager
def stop_after(block: nn.Module):
    """Abort the forward pass right after ``block``: extraction at layer L never pays for blocks > L."""

    def hook(module, args, output):
        raise _StopForward

    with block.register_forward_hook(hook):  # torch's hook handles remove themselves on exit
        try:
            yield
        except _StopForward:
            pass


@contextmanager
def read_last_states(blocks: nn.ModuleList, layers: list[int], last_index: torch.Tensor):
    """Collect each listed block's output at row ``i``'s position ``last_index[i]`` (or positions: a row of
    ``last_index`` per batch row, for several sequences in one row).

    Yields a dict {layer: Tensor[batch, (positions,) hidden]} that fills as the forward runs; only the vectors
    asked for are kept, so memory stays O(batch x hidden x layers), never x sequence.
    """
    found: dict[int, torch.Tensor] = {}

    def make_hook(layer):
        def hook(module, args, output):
            hidden = _hidden(output)
            rows = torch.arange(hidden.shape[0], device=hidden.device).view(-1, *[1] * (last_index.dim() - 1))
            found[layer] = hidden[rows, last_index.to(hidden.device)].detach()

        return hook

    with ExitStack() as hooks:
        for layer in layers:
            hooks.enter_context(blocks[layer].register_forward_hook(make_hook(layer)))
        yield found


@dataclass(frozen=True)
class Intervention:
    """What one row's patch writes into block ``layer``'s output: ``vector`` replaces the state
    (``op="replace"``) or is added to it times ``scale`` (``op="add"``). Where it is written (the position)
    travels with each call, as lm-eval's batches decide it."""

    vector: torch.Tensor  # [hidden]
    layer: int
    op: str = "replace"
    scale: float = 1.0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r} is unknown: use one of {', '.join(OPS)}")


@dataclass
class PatchRecord:
    """What a patch hook did: how often its block ran and how often it wrote a state."""

    calls: int = 0
    patched: int = 0


@contextmanager
def intervene(
    blocks: nn.ModuleList, interventions: list[Intervention | None], positions, first_call_only: bool = False
):
    """Apply row i's intervention (None: the row stays untouched) at ``positions[i]`` (or one int for all rows):
    one hook per distinct layer, each of which must write on exactly one forward pass (with
    ``first_call_only``, the prompt's pass of ``generate()``; decode steps stay untouched)."""
    layers = sorted({iv.layer for iv in interventions if iv is not None})
    if not layers:
        yield
        return
    some = next(iv.vector for iv in interventions if iv is not None)
    zero = torch.zeros(some.shape[-1], dtype=torch.float32, device=some.device)
    values = torch.stack(
        [
            zero
            if iv is None
            else iv.vector.detach().to(some.device, torch.float32) * (iv.scale if iv.op == "add" else 1.0)
            for iv in interventions
        ]
    )  # float32 until written: a scaled vector is rounded once, to the block's dtype
    add = torch.tensor([iv is not None and iv.op == "add" for iv in interventions])
    at = torch.tensor([iv.layer if iv is not None else -1 for iv in interventions])
    with ExitStack() as stack:
        records = [
            stack.enter_context(write_states(blocks[layer], values, positions, at == layer, first_call_only, add))
            for layer in layers
        ]
        yield
    if any(r.patched != 1 for r in records):
        raise RuntimeError(f"a patch hook fired {[r.patched for r in records]} times on the prompt pass, expected once")


@contextmanager
def write_states(block: nn.Module, values: torch.Tensor, positions, rows=None, first_call_only: bool = False, add=None):
    """Replace ``block``'s output of row i at ``positions[i]`` (or one int for all rows) by ``values[i]``, or add
    ``values[i]`` to it where the bool mask ``add`` says so.

    ``rows`` (a bool mask over the batch) limits the patch to some rows, so one batch can patch each row at
    its own layer. ``first_call_only`` patches the prompt's forward pass of ``generate()`` and leaves decode
    steps alone.
    """
    record = PatchRecord()

    def hook(module, args, output):
        record.calls += 1
        if first_call_only and record.calls > 1:
            return None
        hidden = _hidden(output)
        if hidden.shape[0] != values.shape[0]:
            raise RuntimeError(
                f"patch expected {values.shape[0]} rows but the block ran on {hidden.shape[0]}; "
                "beam search and num_return_sequences > 1 are not supported in hypothesis mode"
            )
        index = torch.arange(hidden.shape[0]) if rows is None else rows.nonzero().squeeze(-1)
        at = torch.full_like(index, positions) if isinstance(positions, int) else positions[index]
        new = values[index.to(values.device)].to(hidden.device, hidden.dtype)
        index, at = index.to(hidden.device), at.to(hidden.device)
        if add is not None:
            added = add[index.cpu()].to(hidden.device)[:, None]
            new = torch.where(added, hidden[index, at] + new, new)
        hidden = hidden.clone()
        hidden[index, at] = new
        record.patched += 1
        return _with_hidden(output, hidden)

    with block.register_forward_hook(hook):
        yield record


@contextmanager
def record_outputs(blocks: nn.ModuleList):
    """Keep every block's whole output from one forward pass: a list, in block order, for ``replay_outputs``."""
    found: list = [None] * len(blocks)

    def make_hook(index):
        def hook(module, args, output):
            found[index] = output

        return hook

    with ExitStack() as hooks:
        for i, block in enumerate(blocks):
            hooks.enter_context(block.register_forward_hook(make_hook(i)))
        yield found


@contextmanager
def replay_outputs(blocks: nn.ModuleList, outputs: list, copies: int = 1, columns: int = 1):
    """Blocks 0..len(outputs)-1 return their recorded output instead of running; their forward hooks still run.
    With ``copies`` > 1, the batch holds that many copies of the recorded one, one after another; with
    ``columns`` > 1, each row holds that many copies of its recorded columns.

    Exact when the pass differs from the recorded one only from the last replayed block's output on (e.g. a
    patch there): a block's output depends on its inputs and its own layer's KV cache alone, so every block
    below the patch would recompute what was recorded. The replayed blocks write nothing to the KV cache.
    """
    if copies > 1 or columns > 1:
        outputs = [
            _with_hidden(output, _hidden(output).repeat(copies, columns, *[1] * (_hidden(output).dim() - 2)))
            for output in outputs
        ]
    saved = [block.__dict__.get("forward") for block in blocks[: len(outputs)]]  # accelerate may wrap forward
    for block, output in zip(blocks, outputs):
        block.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
