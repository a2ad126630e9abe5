"""Hooks on blocks that return a tuple (transformers < 5) behave as on blocks that return a Tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_eval_taskvec.extraction import common_prefix_length
from lm_eval_taskvec.layers import find_blocks, read_last_states, resolve_layer, write_states


class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return (x + self.linear(x), "extra")


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(TupleBlock() for _ in range(3))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        for block in self.layers:
            x, extra = block(x)
            assert extra == "extra"  # the rest of the tuple survives a patch
        return self.head(x)


def test_tuple_outputs_are_patched_and_read():
    model, x = TupleModel(), torch.randn(2, 5, 4)
    base = model(x)
    with read_last_states(model.layers, [1], torch.tensor([4, 2])) as found:
        model(x)
    with write_states(model.layers[1], found[1], torch.tensor([4, 2])) as record:
        same = model(x)
    torch.testing.assert_close(same, base)
    with write_states(model.layers[1], torch.zeros(2, 4), torch.tensor([4, 2])) as record:
        changed = model(x)
    assert record.calls == record.patched == 1
    assert torch.equal(changed[0, :4], base[0, :4]) and not torch.equal(changed[0, 4], base[0, 4])
    assert torch.equal(changed[1, :2], base[1, :2]) and not torch.equal(changed[1, 2], base[1, 2])


def test_row_mask_patches_only_those_rows():
    model, x = TupleModel(), torch.randn(3, 5, 4)
    base = model(x)
    with write_states(model.layers[0], torch.zeros(3, 4), -1, rows=torch.tensor([False, True, False])):
        out = model(x)
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]])
    assert not torch.allclose(out[1, -1], base[1, -1])


def test_hooks_are_removed_when_an_exception_flies():
    model = TupleModel()
    with pytest.raises(RuntimeError, match="boom"):
        with (
            write_states(model.layers[0], torch.zeros(1, 4), -1),
            read_last_states(model.layers, [2], torch.tensor([0])),
        ):
            raise RuntimeError("boom")
    assert all(not block._forward_hooks for block in model.layers)


def test_unsupported_block_output_raises_instead_of_doing_nothing():
    class DictBlock(nn.Module):
        def forward(self, x):
            return {"hidden": x}

    block = DictBlock()
    with write_states(block, torch.zeros(1, 4), -1), pytest.raises(TypeError, match="unsupported block output"):
        block(torch.zeros(1, 2, 4))


def test_blocks_found_by_size_and_configured_depth():
    model = TupleModel()
    model.decoys = nn.ModuleList(nn.Linear(1, 1) for _ in range(3))  # same length, fewer parameters
    assert find_blocks(model) is model.layers
    model.config = type("Config", (), {"num_hidden_layers": 3})()
    model.bigger = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))  # more parameters, not the configured depth
    assert find_blocks(model) is model.layers
    assert resolve_layer(-1, 30) == 29 and resolve_layer(0.66, 30) == 19 and resolve_layer(5.0, 30) == 5


def test_fractions_of_depth_and_layers_path():
    assert [resolve_layer(f, 30) for f in (0.01, 0.5, 0.999)] == [0, 15, 29]
    model = TupleModel()
    model.one = nn.ModuleList([nn.Linear(4, 4)])
    assert find_blocks(model, "one") is model.one  # a one-block ModuleList is a valid layers_path
    with pytest.raises(ValueError, match=r"layers_path='one.0' is a Linear, not a non-empty ModuleList"):
        find_blocks(model, "one.0")
    model.empty = nn.ModuleList()
    with pytest.raises(ValueError, match=r"layers_path='empty' is a ModuleList, not a non-empty ModuleList"):
        find_blocks(model, "empty")
    with pytest.raises(ValueError, match=r"layers_path='nope' names no submodule of TupleModel"):
        find_blocks(model, "nope")


def test_common_prefix_leaves_every_prompt_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # the shorter prompt keeps its last token
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([[7, 8, 9, 1], [7, 8, 9, 2], [7, 3]]) == 1
