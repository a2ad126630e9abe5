"""``hf-taskvec``: HFLM with three evaluation modes of "In-Context Learning Creates Task Vectors".

- ``regular``: stock HFLM, the model sees demonstrations S and query x.
- ``baseline``: the model sees the query x alone.
- ``hypothesis``: θ = output of block L at the last token of [S, x'], averaged over dummy queries x';
  then the query alone runs with block L's output at its last position replaced by θ, in the prompt's
  forward pass only.

lm-eval batches, sorts and pads requests itself; this class rewrites each request's context into its query,
and tells the patch hooks which θ and layer belong to which row: in ``generate_until`` through
``tok_batch_encode`` (left padding, last column), in ``loglikelihood`` through a lookup from each row's
tokens (right padding, last context token).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import DynamicCache

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.contexts import Split, choose_dummies, read_escapes, rendered_queries, split_at_delimiter, split_for_task
from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path, identity
from lm_eval_taskvec.extraction import (Prefix, cache_argument, common_prefix_length, last_token_states, prefill_columns,
                                        states_after, within_window)
from lm_eval_taskvec.layers import find_blocks, replace_states, resolve_layer

log = logging.getLogger("lm_eval.taskvec")  # under lm_eval, so its console handler shows our lines

MODES = ("regular", "hypothesis", "baseline")
AUTO = "auto"
LAYER_CACHE = {"on": ("on", "true", "yes", "1"), "refresh": ("refresh",), "off": ("off", "false", "no", "0")}
EXTRACT_BATCH_SIZE = 16  # used when batch_size=auto
MAX_BATCH_GROWTH = 8  # query-only batches hold at most this many times batch_size rows
CPU_AUTO_BATCH_SIZE = 8  # batch_size=auto on a CPU: nothing to probe (see _detect_batch_size)
CACHE_MARKER = "__hf_taskvec_identity__"  # the --use_cache database records which mode wrote it


@dataclass(frozen=True)
class ThetaKey:
    """Identifies θ: the prompts [S, x'] exactly as the regular path would tokenize them."""

    demos: str
    dummies: tuple[str, ...]
    strip: bool  # likelihood requests: trailing whitespace of the context moves onto the continuation
    max_tokens: int | None = None  # left-truncate each prompt to this many tokens, as regular mode does
    stored: str | None = None  # θ read from a theta_path file ("path#task@layer"), not extracted


@dataclass(frozen=True)
class Plan:
    """What one request becomes: the query the model sees and, in hypothesis mode, which θ to patch where."""

    query: str
    theta_key: ThetaKey | None = None
    layer: int | None = None
    patch: bool = True  # False: regular mode preparing θ for a later hypothesis run (see shared_modes)


@register_model("hf-taskvec")
class TaskVectorLM(HFLM):
    def __init__(
        self,
        pretrained=EMBEDDED_NAME,
        mode: str = "regular",
        layer: int | float | str = AUTO,
        num_dummy: int = 2,
        seed: int = 1234,
        fewshot_delimiter: str | None = None,
        layers_path: str | None = None,
        num_dev: int = 50,
        layer_cache: str | bool = "on",
        device: str | None = None,
        theta_path: str | None = None,
        **kwargs,
    ) -> None:
        if pretrained == EMBEDDED_NAME:
            pretrained = embedded_model_path()
        kwargs["device"] = _device(device)
        self.embedded = identity(pretrained) if isinstance(pretrained, str) else None  # what "embedded" is
        self.mode = _check_mode(mode)
        self.num_dummy = _as_int("num_dummy", num_dummy, minimum=1)
        self.seed = _as_int("seed", seed)
        self.num_dev = _as_int("num_dev", num_dev, minimum=2)
        self.layer_cache = _check_layer_cache(layer_cache)
        self.fewshot_delimiter = read_escapes(fewshot_delimiter) if fewshot_delimiter else None
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError("hf-taskvec supports decoder-only (causal) models, got backend=seq2seq")
        self.blocks = find_blocks(self.model, layers_path)
        self.layer = self._check_layer(layer)
        self.stored_thetas = self._load_thetas(theta_path) if theta_path else None
        self.selections: dict[str, dict] = {}  # task -> chosen layer and its dev curve (layer=auto), for the results
        self.layer_choices: dict[str, dict] = {}  # layer-cache key -> choice, this process's memory of sweeps
        self.shared_modes: tuple[str, ...] = ()  # modes evaluated in turn on this instance: regular prepares θ,
        self._forked_baseline: dict[tuple, torch.Tensor] = {}  # and hypothesis generates baseline's answers too
        self._theta_cache: dict[tuple[int, ThetaKey], torch.Tensor] = {}
        self._query_pools: dict[str, tuple[object, set[str]]] = {}  # task -> (task object, its rendered queries)
        self._warned: set[str] = set()
        self._generation_plans: dict[str, Plan] | None = None  # context -> plan, during generate_until
        self._batch_plans: list[Plan] | None = None  # plans of the batch tok_batch_encode just built
        self._row_patches: dict[tuple, tuple[Plan, int]] | None = None  # row tokens -> (plan, position)
        self._probe_tokens: int | None = None  # longest prompt + new tokens of the running generate_until
        self._warned_cpu_auto = False
        self._chat_template_used = self._warned_instruct = False

    def _check_layer(self, layer) -> int | str:
        if isinstance(layer, str):
            text = layer.strip().lower()
            if text == AUTO:
                return AUTO
            try:
                layer = float(text) if "." in text else int(text)
            except ValueError:
                raise ValueError(f"layer={layer!r} is not a block index, a fraction of depth or 'auto'") from None
        if isinstance(layer, bool) or not isinstance(layer, (int, float)):
            raise ValueError(f"layer={layer!r} is not a block index, a fraction of depth or 'auto'")
        return resolve_layer(layer, len(self.blocks))

    def _load_thetas(self, path: str):
        """θ per task from ``taskvec export``: hypothesis mode then needs no demonstrations at all."""
        if self.mode != "hypothesis":
            raise ValueError(f"theta_path= patches stored task vectors, which only mode=hypothesis does (got mode={self.mode})")
        from lm_eval_taskvec.analyses.export import load_thetas

        return load_thetas(path, self)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    # ------------------------------------------------------------------ splitting, planning and θ extraction
    def split(self, request) -> tuple[Split, tuple[str, ...]]:
        """S and x of a request, and the document's own queries (never its dummies)."""
        task = LOADED_TASKS.get(request.task_name)
        context = request.args[0]
        if task is not None and request.doc:
            if (getattr(task, "taskvec_prompt_settings", None) or {}).get("apply_chat_template"):
                raise ValueError(
                    f"task {request.task_name!r} was rendered with a chat template (--apply_chat_template), which "
                    f"hides where its demonstrations end: mode={self.mode} supports plain few-shot prompts only. "
                    "Run without --apply_chat_template (and --fewshot_as_multiturn)."
                )
            own = rendered_queries(task, request.doc)
            shots = task.get_config("num_fewshot") or 0
            return split_for_task(context, own, shots, request.task_name, need_demos=self.stored_thetas is None), own
        if self.stored_thetas is not None and self.fewshot_delimiter is None:
            return Split("", context), (context,)  # a stored θ stands in for the demonstrations
        if self.fewshot_delimiter is None:
            raise ValueError(
                f"task {request.task_name!r} was not loaded by lm-eval in this process, so its demonstrations cannot "
                "be told from its query: evaluate it through lm_eval / lm_eval.simple_evaluate, or pass the model "
                "arg fewshot_delimiter=<the task's few-shot delimiter, e.g. \\n>"
            )
        self.warn_once(f"task {request.task_name!r}: not loaded by lm-eval here, so its contexts are split at the "
                       f"last fewshot_delimiter={self.fewshot_delimiter!r} (model arg)")
        split = split_at_delimiter(context, self.fewshot_delimiter)
        return split, (split.query,)

    def query_pool(self, task_name: str) -> set[str]:
        """The rendered queries of every evaluated document of a loaded task, so that dummies depend neither
        on --limit nor on how many processes share the documents; empty for tasks lm-eval did not load."""
        task = LOADED_TASKS.get(task_name)
        if task is None or not hasattr(task, "eval_docs"):
            return set()
        known = self._query_pools.get(task_name)
        if known is None or known[0] is not task:
            known = self._query_pools[task_name] = (task, {q for doc in task.eval_docs for q in rendered_queries(task, doc)})
        return known[1]

    def plan(self, requests, layer: int | None = None, extract: bool = True) -> list[Plan]:
        """Split every request's context; in hypothesis mode also choose dummies and the layer (``layer``
        overrides it for every task), and compute the θ not cached yet unless ``extract`` is false."""
        splits = [self.split(req) for req in requests]
        for req, (split, _) in zip(requests, splits):
            self._check_query(req, split.query)
        if self.mode == "baseline":
            return [Plan(split.query) for split, _ in splits]
        if self.stored_thetas is not None:
            return [self._stored_plan(req, split) for req, (split, _) in zip(requests, splits)]
        pools: dict[str, set[str]] = defaultdict(set)
        for req, (split, _) in zip(requests, splits):
            pools[req.task_name] |= self.query_pool(req.task_name) or {split.query}
        if layer is None:
            self.choose_layers(pools)
        plans = []
        for req, (split, own) in zip(requests, splits):
            dummies = choose_dummies(pools[req.task_name], own, self.num_dummy, self.seed, req.task_name, split.demos)
            key = self._theta_key(req, split, dummies)
            plans.append(Plan(split.query, key, self.layer_for(req) if layer is None else layer))
        if extract:
            tasks = ", ".join(sorted(map(str, pools)))
            self.ensure_thetas({(p.layer, p.theta_key) for p in plans}, f"{tasks}: extracting θ")
        return plans

    def _stored_plan(self, request, split: Split) -> Plan:
        stored = self.stored_thetas.get(request.task_name, None if self.layer == AUTO else self.layer)
        key = ThetaKey("", (), request.request_type != "generate_until",
                       stored=f"{self.stored_thetas.path}#{stored.task}@{stored.layer}")
        self._theta_cache.setdefault((stored.layer, key), stored.theta.to(self.device))
        return Plan(split.query, key, stored.layer)

    def _budget(self, request, query: str) -> int:
        """How many context tokens the regular path keeps for this request (HFLM truncates from the left)."""
        if request.request_type == "generate_until":
            return self.max_length - int((request.args[1] or {}).get("max_gen_toks") or self.max_gen_toks)
        return self.max_length + 1 - len(self._encode_pair(query, request.args[1])[1])

    def _check_query(self, request, query: str) -> None:
        strip = request.request_type != "generate_until"
        if strip and not query.rstrip():
            raise ValueError(f"task {request.task_name!r}: the query {query!r} is only whitespace, nothing to score after")
        if request.request_type not in ("generate_until", "loglikelihood"):
            return
        length, budget = len(self.tok_encode(query.rstrip() if strip else query)), self._budget(request, query)
        if length > budget:
            raise ValueError(
                f"task {request.task_name!r}: the query alone is {length} tokens, more than the {budget} the model's "
                f"max_length={self.max_length} leaves for it; hf-taskvec never cuts the query: raise max_length"
            )

    def _theta_key(self, request, split: Split, dummies: tuple[str, ...]) -> ThetaKey:
        key = ThetaKey(split.demos, dummies, strip=request.request_type != "generate_until")
        budget = self._budget(request, split.query)
        if max(map(len, self.theta_prompts(key))) <= budget:
            return key
        self.warn_once(f"task {request.task_name!r}: demonstrations longer than max_length={self.max_length}; "
                       "θ's prompts are left-truncated as regular mode truncates the full prompt")
        return ThetaKey(key.demos, key.dummies, key.strip, budget)

    def theta_prompts(self, key: ThetaKey) -> list[list[int]]:
        """Tokens of [S, x'] for each dummy x', tokenized (and truncated) as the regular path does."""
        texts = [key.demos + dummy for dummy in key.dummies]
        tokens = [self.tok_encode(text.rstrip() if key.strip else text) for text in texts]
        return [t[-key.max_tokens :] for t in tokens] if key.max_tokens else tokens

    def layer_for(self, request) -> int:
        """Block L for a request: the fixed layer, or layer=auto's choice for its task (per fold if cross-fitted)."""
        if self.layer != AUTO:
            return self.layer
        from lm_eval_taskvec.selection import layer_of_document

        return layer_of_document(self.selections[request.task_name], request.doc_id)

    def choose_layers(self, task_names) -> None:
        """Run (or recall) layer=auto's choice for each task, before its requests are planned."""
        if self.layer != AUTO:
            return
        from lm_eval_taskvec.selection import select_layer

        for name in sorted(set(task_names)):
            self.selections[name] = select_layer(self, name)

    def ensure_thetas(self, needed: set[tuple[int, ThetaKey]], desc: str = "Extracting task vectors") -> None:
        """Compute every missing θ: one extraction pass per set of layers (a sweep needs all blocks of each
        [S, x'] prompt; an evaluation needs one layer per task, and stops there)."""
        layers_of: dict[ThetaKey, set[int]] = defaultdict(set)
        for layer, key in needed:
            if (layer, key) not in self._theta_cache:
                layers_of[key].add(layer)
        passes: dict[tuple[int, ...], list[ThetaKey]] = defaultdict(list)
        for key, layers in layers_of.items():
            passes[tuple(sorted(layers))].append(key)
        for layers, keys in passes.items():
            states = self.last_token_states([self.theta_prompts(key) for key in keys], list(layers), desc)
            states = states.float().mean(2)  # average over the dummies
            for li, layer in enumerate(layers):
                for ki, key in enumerate(keys):
                    self._theta_cache[(layer, key)] = states[li, ki]

    def last_token_states(self, families: list[list[list[int]]], layers: list[int],
                          desc: str = "Extracting task vectors") -> torch.Tensor:
        """Block outputs at the last token of each prompt: Tensor[layers, families, prompts per family, hidden]."""
        with self._autocast():
            return last_token_states(self.model, self.blocks, families, layers, self.extract_batch_size,
                                     self.rank == 0, desc)

    @property
    def extract_batch_size(self) -> int:
        """Prompts per extraction batch: the user's batch size, or EXTRACT_BATCH_SIZE under batch_size=auto."""
        return self.batch_size_per_gpu if isinstance(self.batch_size_per_gpu, int) else EXTRACT_BATCH_SIZE

    def _autocast(self):
        return torch.autocast(self.device.type, self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None)

    def theta(self, plan: Plan) -> torch.Tensor:
        return self._theta_cache[(plan.layer, plan.theta_key)]

    @contextmanager
    def patched(self, plans: list[Plan], positions, first_call_only: bool = False):
        """Patch each row's θ at its plan's layer and its position (rows whose plan has no θ stay untouched):
        one hook per distinct layer, each of which must fire on exactly one forward pass."""
        thetas = {i: self.theta(p) for i, p in enumerate(plans) if p.theta_key is not None}
        if not thetas:
            yield
            return
        some = next(iter(thetas.values()))
        values = torch.stack([thetas.get(i, torch.zeros_like(some)) for i in range(len(plans))])
        layers = torch.tensor([p.layer if i in thetas else -1 for i, p in enumerate(plans)])
        with ExitStack() as stack:
            records = [
                stack.enter_context(replace_states(self.blocks[layer], values, positions, layers == layer, first_call_only))
                for layer in sorted(set(layers.tolist()) - {-1})
            ]
            yield
        if any(r.patched != 1 for r in records):
            raise RuntimeError(f"a patch hook fired {[r.patched for r in records]} times on the prompt pass, expected once")

    # ------------------------------------------------------------------ generate_until
    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        self._chat_template_used = True
        return super().apply_chat_template(chat_history, add_generation_prompt)

    def _warn_instruct(self) -> None:
        """lm-eval warns when the model args name an instruct or chat model, as --model hf does for SmolLM2's
        folder; "embedded" hides the name, so say it here, before the first request, unless a template is used."""
        if self.embedded and not self._chat_template_used and not self._warned_instruct:
            self._warned_instruct = True
            logging.getLogger("lm_eval.evaluator").warning(
                "pretrained=embedded (%s) appears to be an instruct or chat variant but chat template is not applied. "
                "Recommend setting `apply_chat_template` (optionally `fewshot_as_multiturn`).", self.embedded["model"])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._warn_instruct()
        if self.mode == "regular" and "hypothesis" in self.shared_modes:
            # The full prompts [S, x] and θ's prompts [S, x'] share S: run it once for both.
            plans = [replace(p, query=r.args[0], patch=False) for r, p in zip(requests, self.plan(requests, extract=False))]
            return self.generate_planned(requests, plans, disable_tqdm)
        if self.mode == "regular":
            new_tokens = max(int(r.args[1].get("max_gen_toks") or self.max_gen_toks) for r in requests)
            with self._probing(len(self.tok_encode(max((r.args[0] for r in requests), key=len))) + new_tokens):
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
        if self.mode == "hypothesis":
            self._forked_baseline.clear()
            for request in requests:
                kwargs = request.args[1] or {}
                if max(int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1)) > 1:
                    raise ValueError(f"task {request.task_name!r} asks for num_beams/num_return_sequences > 1: "
                                     "hypothesis mode patches one θ per prompt row; use greedy or sampled decoding")
        return self.generate_planned(requests, self.plan(requests), disable_tqdm)

    def generate_planned(self, requests, plans: list[Plan], disable_tqdm: bool = False) -> list[str]:
        """Generate for each request from its plan's query text, with its plan's θ (if any) patched at the
        query's last token in the prompt's forward pass."""
        new_tokens = max(int(r.args[1].get("max_gen_toks") or self.max_gen_toks) for r in requests)
        full = len(self.tok_encode(max((r.args[0] for r in requests), key=len))) + new_tokens
        short = len(self.tok_encode(max((p.query for p in plans), key=len))) + new_tokens

        def run(part: list[int]) -> list[str]:
            self._generation_plans = {requests[i].args[0]: plans[i] for i in part}
            try:
                with self._grown_batches(full, short), self._probing(short):
                    return super(TaskVectorLM, self).generate_until([requests[i] for i in part], disable_tqdm)
            finally:
                self._generation_plans = None

        # Each part maps a context string to one plan (the same context from two tasks may differ in θ).
        return _in_parts(len(requests), lambda i: requests[i].args[0], lambda i: plans[i], run)

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        if self._generation_plans is None:
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        if padding_side != "left":
            raise RuntimeError("hf-taskvec patches the last column of a left-padded batch")
        plans = [self._generation_plans[s] for s in strings]
        if any(p.theta_key is not None for p in plans):
            self._batch_plans = plans
        return super().tok_batch_encode([p.query for p in plans], padding_side, left_truncate_len, truncation)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        plans, self._batch_plans = self._batch_plans, None
        key = _batch_key(context, max_length, stop)
        if plans is None:
            if key in self._forked_baseline:  # computed alongside hypothesis, from the same query prefill
                return self._forked_baseline.pop(key)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if not all(p.patch for p in plans):  # regular, preparing θ: stock generation, then θ from its KV cache
            cache = DynamicCache(config=self.model.config)
            answers = super()._model_generate(context, max_length, stop, **generation_kwargs,
                                              **{cache_argument(self.model): cache})
            self._extract_from_cache(cache, context, generation_kwargs["attention_mask"], plans)
            return answers
        if self.mode == "hypothesis" and "baseline" in self.shared_modes and context.shape[1] > 1:
            # Baseline and hypothesis run the same query tokens and differ from the last one on: prefill the
            # rest once, then generate both in one batch, each row twice, its first copy unpatched; baseline's
            # answers wait for the baseline run.
            with torch.no_grad(), self._autocast():
                prefix = prefill_columns(self.model, context[:, :-1], generation_kwargs["attention_mask"][:, :-1],
                                         stop_block=self.blocks[-1])
            rows = context.shape[0]
            both = dict(generation_kwargs, attention_mask=generation_kwargs["attention_mask"].repeat(2, 1),
                        **{cache_argument(self.model): prefix.take(list(range(rows)) * 2).cache})
            with self.patched([replace(p, theta_key=None) for p in plans] + plans, -1, first_call_only=True):
                answers = super()._model_generate(context.repeat(2, 1), max_length, stop, **both)
            self._forked_baseline[key] = answers[:rows]
            return answers[rows:]
        with self.patched(plans, -1, first_call_only=True):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _extract_from_cache(self, cache, context: torch.Tensor, mask: torch.Tensor, plans: list[Plan]) -> None:
        """θ for a later hypothesis run from the KV cache of a regular batch's generation, so that S runs once:
        in a copy of the cache, each row's dummies see only the tokens the row shares with its dummy prompts
        [S, x'] (the columns after them, query and answer, become masked holes) and run only their own tokens.
        Under a sliding window shorter than the cache, holes would move the window: hypothesis extracts θ."""
        todo = [r for r, p in enumerate(plans) if p.theta_key is not None and (p.layer, p.theta_key) not in self._theta_cache]
        families = {r: self.theta_prompts(plans[r].theta_key) for r in todo}
        width = cache.get_seq_length()
        if not todo or not within_window(self.model, width + max(len(t) for f in families.values() for t in f)):
            return
        pads = (mask == 0).sum(-1)
        cuts = {r: common_prefix_length([context[r, pads[r] :].tolist(), *families[r]]) for r in todo}
        ends = pads + torch.tensor([cuts.get(r, 0) for r in range(len(plans))], device=mask.device)
        columns = torch.arange(width, device=mask.device)
        seen = ((columns >= pads[:, None]) & (columns < ends[:, None])).to(mask.dtype)  # each row's S alone
        members = [r for r in todo for _ in families[r]]
        suffixes = [prompt[cuts[r] :] for r in todo for prompt in families[r]]
        layers = sorted({plans[r].layer for r in todo})
        with torch.no_grad(), self._autocast():
            found = states_after(self.model, self.blocks, Prefix(cache, seen).take(members), suffixes, layers)
        for i, r in enumerate(todo):
            k = len(families[r])
            self._theta_cache[(plans[r].layer, plans[r].theta_key)] = found[plans[r].layer][i * k : (i + 1) * k].float().mean(0)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._warn_instruct()
        if self.mode == "regular":
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self.loglikelihood_planned(requests, self.plan(requests), disable_tqdm)

    def loglikelihood_planned(self, requests, plans: list[Plan], disable_tqdm: bool = False):
        encoded = [(req.args, *self._encode_pair(plan.query, req.args[1])) for req, plan in zip(requests, plans)]
        full = len(self.tok_encode(max((r.args[0] for r in requests), key=len))) + max(len(e[2]) for e in encoded)
        with self._grown_batches(full, max(len(e[1]) + len(e[2]) for e in encoded)):
            return self._loglikelihood_patched(encoded, plans, disable_tqdm)

    def _loglikelihood_patched(self, encoded, plans: list[Plan], disable_tqdm: bool):
        if all(p.theta_key is None for p in plans):
            return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

        rows = [self._row_patch(ctx, cont, plan) for (_, ctx, cont), plan in zip(encoded, plans)]

        def run(part: list[int]) -> list:
            self._row_patches = {rows[i][0]: rows[i][1] for i in part}
            try:
                return self._loglikelihood_tokens([encoded[i] for i in part], disable_tqdm=disable_tqdm)
            finally:
                self._row_patches = None

        # Each part maps a row's tokens to one (θ, layer, position), so _model_call can tell rows apart exactly.
        return _in_parts(len(encoded), lambda i: rows[i][0], lambda i: rows[i][1], run)

    @contextmanager
    def _grown_batches(self, full_tokens: int, short_tokens: int):
        """Query-only rows are shorter than the few-shot rows ``batch_size`` was chosen for: batch more of them
        while keeping the tokens per batch (and so memory) within what the user's batch size allows."""
        saved = self.batch_size_per_gpu
        if isinstance(saved, int):
            self.batch_size_per_gpu = saved * max(1, min(MAX_BATCH_GROWTH, full_tokens // max(1, short_tokens)))
        try:
            yield
        finally:
            self.batch_size_per_gpu = saved

    def _row_patch(self, context_enc: list[int], continuation_enc: list[int], plan: Plan):
        """The row HFLM will build for this request (trailing zeros stripped: padding is zeros), and where θ goes."""
        tokens = context_enc + continuation_enc
        cut = max(0, len(tokens) - (self.max_length + 1))  # HFLM truncates from the left
        position = len(context_enc) - 1 - cut
        if position < 0:
            raise ValueError("continuation longer than the model's context: the query was truncated away")
        return _strip_zeros(tuple(tokens[cut:-1])), (plan, position)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._row_patches is None:
            return super()._model_call(inps, attn_mask, labels)
        plans, positions = zip(*(self._row_patches[_strip_zeros(tuple(row))] for row in inps.tolist()))
        with self.patched(list(plans), torch.tensor(positions)):
            return super()._model_call(inps, attn_mask, labels)

    @contextmanager
    def _probing(self, tokens: int):
        self._probe_tokens = tokens
        try:
            yield
        finally:
            self._probe_tokens = None

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """batch_size=auto. HFLM probes generation at max_length (8192 tokens for SmolLM2: 16 GB on a CPU);
        we probe with the longest real prompt. On a CPU there is no out-of-memory error to back off from, so
        the probe would only grow until the machine swaps: use a fixed size instead and say so."""
        if self.device.type == "cpu":
            size = min(self.max_batch_size or CPU_AUTO_BATCH_SIZE, CPU_AUTO_BATCH_SIZE)
            if not self._warned_cpu_auto:
                log.warning("batch_size=auto on the CPU: no out-of-memory signal to probe with, so batch size %d "
                            "(set one with --batch_size N)", size)
                self._warned_cpu_auto = True
            return size
        if requests is None and self._probe_tokens is not None:
            requests, pos = [(None, [0] * self._probe_tokens, [0])], 0  # HFLM's probe length: context + cont - 1
        saved, self._row_patches = self._row_patches, None  # its probe batches are not requests
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._row_patches = saved

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._warn_instruct()
        if self.mode != "regular":
            raise ValueError(
                f"mode={self.mode} needs few-shot demonstrations; loglikelihood_rolling (perplexity) tasks "
                "have none: run them with mode=regular"
            )
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def set_cache_hook(self, cache_hook) -> None:
        """``--use_cache`` keys answers on the request alone: refuse a database another mode or setting wrote."""
        database = getattr(cache_hook, "dbdict", None)
        if database is not None:
            identity = json.dumps(self.answer_identity(), sort_keys=True)
            stored = database.get(CACHE_MARKER)
            if stored is None and len(database) and self.mode != "regular":
                stored = "answers of another model (none of hf-taskvec's marks)"
            if stored is not None and stored != identity:
                raise ValueError(
                    f"--use_cache {database.filename} holds {stored}, and this run is {identity}: lm-eval keys cached "
                    "answers on the request alone, so each mode and setting needs its own --use_cache path"
                )
            database[CACHE_MARKER] = identity
        super().set_cache_hook(cache_hook)

    def answer_identity(self) -> dict:
        """Everything besides the request that decides an answer (the model itself is the user's cache path)."""
        identity = {"model": "hf-taskvec", "mode": self.mode}
        if self.mode == "hypothesis":
            identity |= {"layer": self.layer, "num_dummy": self.num_dummy, "seed": self.seed, "num_dev": self.num_dev,
                         "theta_path": self.stored_thetas and self.stored_thetas.path}
        return identity

    def get_model_info(self) -> dict:
        """Goes into the results JSON's ``config``: the mode and, in hypothesis mode, the layer per task."""
        info = super().get_model_info()
        info["model_device"] = str(self.device)  # lm-eval's "device" records the CLI's string, e.g. "cuda:0" on a CPU
        info["taskvec"] = {"mode": self.mode}
        if self.mode == "hypothesis" and self.stored_thetas is not None:
            info["taskvec"] |= {"layer": self.layer, "theta_path": self.stored_thetas.path,
                                "theta_source": self.stored_thetas.model}
        elif self.mode == "hypothesis":
            info["taskvec"] |= {"layer": self.layer, "num_dummy": self.num_dummy, "seed": self.seed,
                                "layer_selection": self.selections}
        if self.embedded:  # lm-eval's model_sha is a Hub commit; ours is the hash of the file we converted
            info |= {"model_revision": self.embedded["package"], "model_sha": self.embedded["gguf_sha256"],
                     "embedded_model": self.embedded}
        return info


def _in_parts(n: int, key, value, run) -> list:
    """``run`` over items 0..n-1 in as few parts as possible such that within a part, equal keys have equal
    values; results come back in item order."""
    parts: list[tuple[dict, list[int]]] = []
    for i in range(n):
        k, v = key(i), value(i)
        for seen, members in parts:
            if seen.setdefault(k, v) == v:
                members.append(i)
                break
        else:
            parts.append(({k: v}, [i]))
    results: list = [None] * n
    for _, members in parts:
        for i, output in zip(members, run(members)):
            results[i] = output
    return results


def _batch_key(context: torch.Tensor, max_length: int, stop) -> tuple:
    """The same query batch in the baseline run as in the hypothesis run that generated its answers."""
    return context.shape, context.cpu().numpy().tobytes(), max_length, tuple(stop)


def _strip_zeros(row: tuple) -> tuple:
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return row[:end]


def _device(device: str | None) -> str:
    """CUDA when available, else the CPU, unless a device is given. HFLM alone defaults to "cuda" (a crash on
    CPU-only machines); lm_eval's CLI sends "cuda:0" when --device is left out, which counts as not given."""
    if device is None or (device == "cuda:0" and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _check_layer_cache(value) -> str:
    text = str(value).strip().lower()
    for setting, spellings in LAYER_CACHE.items():
        if text in spellings:
            return setting
    raise ValueError(f"layer_cache={value!r} is unknown: use on (read and write), refresh (sweep again, write) or off")


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
