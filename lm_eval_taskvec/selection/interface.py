"""What the layer sweep needs from the model: hf-taskvec's model class provides it; nothing here imports it."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from torch import nn

from lm_eval_taskvec.planning import Planner
from lm_eval_taskvec.selection.cache import LayerCache
from lm_eval_taskvec.settings import Settings
from lm_eval_taskvec.theta import ThetaStore


class SweepModel(Protocol):
    model: nn.Module
    blocks: nn.ModuleList
    settings: Settings
    planner: Planner  # requests -> plans (query, θ key)
    thetas: ThetaStore  # θ of every block goes here
    choice_cache: LayerCache
    max_length: int
    rank: int
    revision: str | None

    @property
    def extract_batch_size(self) -> int: ...

    def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> list[int]: ...

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]: ...

    def autocast(self) -> AbstractContextManager: ...

    def patched(self, plans: list, positions, first_call_only: bool = False) -> AbstractContextManager: ...

    def warn_once(self, message: str) -> None: ...
