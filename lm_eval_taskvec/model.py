"""``hf-taskvec``: HFLM with three evaluation modes of "In-Context Learning Creates Task Vectors".

- ``regular``: stock HFLM, the model sees demonstrations S and query x.
- ``baseline``: the model sees the query x alone.
- ``hypothesis``: θ = output of block L at the last token of [S, x'], averaged over dummy queries x';
  then the query alone runs with block L's output at its last position replaced by θ, in the prompt's
  forward pass only.

lm-eval batches, sorts and pads requests itself; this class rewrites each request's context into its query,
and tells the patch hook which θ belongs to which row: in ``generate_until`` through ``tok_batch_encode``
(left padding, last column), in ``loglikelihood`` through a lookup from each row's tokens (right padding,
last context token).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from lm_eval_taskvec.contexts import SplitContext, choose_dummies, split_context
from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path
from lm_eval_taskvec.layers import find_blocks, read_last_states, replace_states, resolve_layer, stop_after

log = logging.getLogger(__name__)

MODES = ("regular", "hypothesis", "baseline")
EXTRACT_BATCH_SIZE = 16  # used when batch_size=auto


@dataclass(frozen=True)
class Plan:
    """What one request becomes: the query the model sees and, in hypothesis mode, the θ to patch in."""

    query: str
    theta_key: tuple | None  # (demos, delimiter, dummies): identifies θ


@register_model("hf-taskvec")
class TaskVectorLM(HFLM):
    def __init__(
        self,
        pretrained=EMBEDDED_NAME,
        mode: str = "regular",
        layer: int | float | str | None = None,
        num_dummy: int = 2,
        seed: int = 1234,
        fewshot_delimiter: str | None = None,
        layers_path: str | None = None,
        **kwargs,
    ) -> None:
        if pretrained == EMBEDDED_NAME:
            pretrained = embedded_model_path()
        self.mode = _check_mode(mode)
        self.num_dummy = _as_int("num_dummy", num_dummy, minimum=1)
        self.seed = _as_int("seed", seed)
        self.fewshot_delimiter = fewshot_delimiter or None
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError("hf-taskvec supports decoder-only (causal) models, got backend=seq2seq")
        self.blocks = find_blocks(self.model, layers_path)
        self.layer = self._check_layer(layer)
        self._theta_cache: dict[tuple, torch.Tensor] = {}
        self._generation_plans: dict[str, Plan] | None = None  # context -> plan, during generate_until
        self._batch_theta: torch.Tensor | None = None  # θ rows of the batch tok_batch_encode just built
        self._row_patches: dict[tuple, tuple[tuple, int]] | None = None  # row tokens -> (θ key, position)

    def _check_layer(self, layer) -> int | None:
        if layer is None or layer == "":
            if self.mode == "hypothesis":
                raise ValueError("mode=hypothesis needs a layer: pass layer=<block index or fraction>, e.g. layer=0.6")
            return None
        if isinstance(layer, str):
            if layer.strip().lower() == "auto":
                raise ValueError("layer=auto is not available yet: pass a block index or a fraction, e.g. layer=0.6")
            try:
                layer = float(layer) if "." in layer else int(layer)
            except ValueError:
                raise ValueError(f"layer={layer!r} is not a block index, a fraction of depth or 'auto'") from None
        if isinstance(layer, bool) or not isinstance(layer, (int, float)):
            raise ValueError(f"layer={layer!r} is not a block index, a fraction of depth or 'auto'")
        return resolve_layer(layer, len(self.blocks))

    # ------------------------------------------------------------------ planning and θ extraction
    def _plan(self, requests) -> list[Plan]:
        """Split every request's context; in hypothesis mode also choose dummies and compute θ."""
        splits = [split_context(req.args[0], self.fewshot_delimiter) for req in requests]
        if self.mode == "baseline":
            return [Plan(s.query, None) for s in splits]
        pools: dict[str, set[str]] = defaultdict(set)
        for req, split in zip(requests, splits):
            pools[req.task_name or ""].add(split.query)
        plans = []
        for req, split in zip(requests, splits):
            task = req.task_name or ""
            dummies = choose_dummies(pools[task], split.query, self.num_dummy, self.seed, task, split.demos)
            plans.append(Plan(split.query, (split.demos, split.delimiter, dummies)))
        self._ensure_thetas({p.theta_key for p in plans})
        return plans

    def _ensure_thetas(self, keys: set[tuple]) -> None:
        """Compute θ for every key not cached yet: one extraction pass over all [S, x'] prompts."""
        missing = sorted(k for k in keys if (self.layer, k) not in self._theta_cache)
        if not missing:
            return
        prompts = sorted({SplitContext(d, delim, "").with_query(x) for d, delim, dummies in missing for x in dummies})
        states = self.last_token_states(prompts, [self.layer])[self.layer]
        row = {p: i for i, p in enumerate(prompts)}
        for demos, delim, dummies in missing:
            rows = [row[SplitContext(demos, delim, "").with_query(x)] for x in dummies]
            theta = states[rows].float().mean(0)
            self._theta_cache[(self.layer, (demos, delim, dummies))] = theta

    def last_token_states(self, prompts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
        """Each block in ``layers``'s output at the last token of each prompt: {layer: Tensor[n, hidden]}.

        Prompts run right-padded with no attention mask (as HFLM scores likelihoods): causal attention keeps
        padding out of every real position. The forward stops after the deepest block needed.
        """
        encoded = [self.tok_encode(p, left_truncate_len=self.max_length) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        size = self.batch_size_per_gpu if isinstance(self.batch_size_per_gpu, int) else EXTRACT_BATCH_SIZE
        out = {layer: [None] * len(prompts) for layer in layers}
        for start in tqdm(range(0, len(order), size), desc="Extracting task vectors", disable=self.rank != 0):
            batch = order[start : start + size]
            width = len(encoded[batch[0]])
            inps = torch.zeros(len(batch), width, dtype=torch.long)
            for r, i in enumerate(batch):
                inps[r, : len(encoded[i])] = torch.tensor(encoded[i])
            last = torch.tensor([len(encoded[i]) - 1 for i in batch])
            with read_last_states(self.blocks, layers, last) as found, stop_after(self.blocks[max(layers)]):
                super()._model_call(inps.to(self.device))
            for layer in layers:
                for r, i in enumerate(batch):
                    out[layer][i] = found[layer][r]
        return {layer: torch.stack(rows) for layer, rows in out.items()}

    def _theta(self, key: tuple) -> torch.Tensor:
        return self._theta_cache[(self.layer, key)]

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.mode == "regular":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        plans = self._plan(requests)
        results: list[str | None] = [None] * len(requests)
        # Each part maps a context string to one plan (the same context from two tasks may differ in θ).
        for part in _partition(range(len(requests)), lambda i: requests[i].args[0], lambda i: plans[i]):
            self._generation_plans = {requests[i].args[0]: plans[i] for i in part}
            try:
                outputs = super().generate_until([requests[i] for i in part], disable_tqdm=disable_tqdm)
            finally:
                self._generation_plans = None
            for i, output in zip(part, outputs):
                results[i] = output
        return results

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        if self._generation_plans is None:
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        if padding_side != "left":
            raise RuntimeError("hf-taskvec patches the last column of a left-padded batch")
        plans = [self._generation_plans[s] for s in strings]
        if self.mode == "hypothesis":
            self._batch_theta = torch.stack([self._theta(p.theta_key) for p in plans])
        return super().tok_batch_encode([p.query for p in plans], padding_side, left_truncate_len, truncation)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        theta, self._batch_theta = self._batch_theta, None
        if theta is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with replace_states(self.blocks[self.layer], theta, -1, first_call_only=True) as record:
            output = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if record.patched != 1:
            raise RuntimeError(f"patch hook fired {record.patched} times on the prompt pass, expected once")
        return output

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.mode == "regular":
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        plans = self._plan(requests)
        encoded = []
        for req, plan in zip(requests, plans):
            context, continuation = req.args
            if not plan.query:
                raise ValueError(f"empty query after the last few-shot delimiter in {context[-80:]!r}")
            encoded.append(((context, continuation), *self._encode_pair(plan.query, continuation)))
        if self.mode == "baseline":
            return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

        rows = [self._row_patch(ctx, cont, plan) for (_, ctx, cont), plan in zip(encoded, plans)]
        results: list = [None] * len(requests)
        # Each part maps a row's tokens to one (θ, position), so _model_call can tell rows apart exactly.
        for part in _partition(range(len(requests)), lambda i: rows[i][0], lambda i: rows[i][1]):
            self._row_patches = {rows[i][0]: rows[i][1] for i in part}
            try:
                outputs = self._loglikelihood_tokens([encoded[i] for i in part], disable_tqdm=disable_tqdm)
            finally:
                self._row_patches = None
            for i, output in zip(part, outputs):
                results[i] = output
        return results

    def _row_patch(self, context_enc: list[int], continuation_enc: list[int], plan: Plan):
        """The row HFLM will build for this request (trailing zeros stripped: padding is zeros), and where θ goes."""
        tokens = context_enc + continuation_enc
        cut = max(0, len(tokens) - (self.max_length + 1))  # HFLM truncates from the left
        position = len(context_enc) - 1 - cut
        if position < 0:
            raise ValueError("continuation longer than the model's context: the query was truncated away")
        return _strip_zeros(tuple(tokens[cut:-1])), (plan.theta_key, position)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._row_patches is None:
            return super()._model_call(inps, attn_mask, labels)
        thetas, positions = [], []
        for row in inps.tolist():
            theta_key, position = self._row_patches[_strip_zeros(tuple(row))]
            thetas.append(self._theta(theta_key))
            positions.append(position)
        with replace_states(self.blocks[self.layer], torch.stack(thetas), torch.tensor(positions)) as record:
            logits = super()._model_call(inps, attn_mask, labels)
        if record.patched != 1:
            raise RuntimeError(f"patch hook fired {record.patched} times in one forward pass, expected once")
        return logits

    def _detect_batch_size(self, requests=None, pos: int = 0):
        saved, self._row_patches = self._row_patches, None  # its probe batches are not requests
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._row_patches = saved

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.mode != "regular":
            raise ValueError(
                f"mode={self.mode} needs few-shot demonstrations; loglikelihood_rolling (perplexity) tasks "
                "have none: run them with mode=regular"
            )
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)


def _partition(indices, key, value) -> list[list[int]]:
    """Split ``indices`` into as few parts as possible such that within a part, equal keys have equal values."""
    parts: list[tuple[dict, list[int]]] = []
    for i in indices:
        k, v = key(i), value(i)
        for seen, members in parts:
            if seen.setdefault(k, v) == v:
                members.append(i)
                break
        else:
            parts.append(({k: v}, [i]))
    return [members for _, members in parts]


def _strip_zeros(row: tuple) -> tuple:
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return row[:end]


def _check_mode(mode) -> str:
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    return mode


def _as_int(name: str, value, minimum: int | None = None) -> int:
    """Coerce a model arg: lm-eval's CLI turns "2" into 2 but "-1" into -1.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r} must be an integer")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None
    if not number.is_integer() or (minimum is not None and number < minimum):
        raise ValueError(f"{name}={value!r} must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    return int(number)
