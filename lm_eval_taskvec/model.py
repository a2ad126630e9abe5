"""``hf-taskvec``: HFLM with the three evaluation modes of "In-Context Learning Creates Task Vectors".

The class is a set of overrides of HFLM's request callbacks (their order is in ``handoff``): each rewrites a
request's context into its plan's query (``planning``) and applies the plan's θ (``layers.intervene``) at the
query's last token of the prompt's forward pass. θ live in one ``ThetaStore``, layer choices come from
``selection``.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import DynamicCache

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.chat import record as record_chat
from lm_eval_taskvec.chat import uses_chat
from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path, embedded_record
from lm_eval_taskvec.extraction import cache_argument, prefill_columns
from lm_eval_taskvec.handoff import Handoff, SharedModes, batch_key, in_parts, row_key
from lm_eval_taskvec.heads import find_attention_outputs
from lm_eval_taskvec.layers import find_blocks, intervene, resolve_layer
from lm_eval_taskvec.planning import Plan, Planner, document_index
from lm_eval_taskvec.preflight import beam_refusal, check_run, rolling_refusal
from lm_eval_taskvec.selection import (
    function_vector,
    function_vector_of,
    layer_of_document,
    select_layer,
    task_mean_key,
)
from lm_eval_taskvec.selection.cache import LayerCache
from lm_eval_taskvec.settings import AUTO, METHODS, Settings, check_mode, read_method
from lm_eval_taskvec.theta import ThetaStore
from lm_eval_taskvec.thetafile import load_thetas, made_with

log = logging.getLogger("lm_eval.taskvec")  # under lm_eval, so its console handler shows our lines

EXTRACT_BATCH_SIZE = 16  # used when batch_size=auto
MAX_BATCH_GROWTH = 8  # query-only batches hold at most this many times batch_size rows
CPU_AUTO_BATCH_SIZE = 8  # batch_size=auto on a CPU: nothing to probe (see _detect_batch_size)
CACHE_MARKER = "__hf_taskvec_identity__"  # the --use_cache database records which mode and settings wrote it


@register_model("hf-taskvec")
class TaskVectorLM(HFLM):
    """HFLM in one of three modes: ``regular`` (stock HFLM: demonstrations S and query x), ``hypothesis`` (x
    alone, with block L's output at its last token replaced by θ, the mean of block L's outputs at the last
    token of [S, x'] over dummy queries x') and ``baseline`` (x alone).

    Args (besides everything HFLM takes, e.g. ``dtype``, ``batch_size``, ``parallelize``, ``gguf_file``):
        pretrained: a model name or folder as for HFLM; ``embedded`` (default) is the bundled SmolLM2-135M-Instruct.
        mode: ``regular``, ``hypothesis`` or ``baseline``.
        layer: block L: ``auto`` (chosen per task on dev documents), a 0-based index (negative from the end) or a
            fraction of depth in (0, 1).
        num_dummy: dummy queries averaged into θ (2).
        seed: seed for dummies and layer=auto's dev prompts (1234).
        num_dev: dev prompts per task (per half when cross-fitted) for layer=auto (50).
        layer_cache: ``on`` (reuse and write choices), ``refresh`` (sweep again, write) or ``off``.
        fewshot_delimiter: splits S and x of requests from tasks lm-eval did not load (direct API calls).
        theta_path: a ``taskvec export`` file: hypothesis patches its stored θ instead of extracting θ.
        layers_path: dotted path to the ModuleList of decoder blocks, for exotic architectures.
        method: hypothesis mode's method (docs/methods.md): ``hendel`` (default: each prompt's θ replaces block L's
            output), ``elicit`` (h + 2·θ), ``task_mean`` (one θ per task, the mean over its dev prompts') or
            ``function_vector`` (Todd et al. 2024: h + the sum of the top attention heads' mean outputs).
        vector, op, scale: the method's parts, each overriding its preset: ``prompt``, ``task_mean`` or
            ``function_vector``; ``replace`` or ``add``; the factor of an added θ.
        top_heads: vector=function_vector: heads summed into the function vector (10).
        num_mean_prompts, num_aie_prompts: vector=function_vector: the first n dev prompts that the head means
            average over and that the heads are ranked on (default: all ``num_dev``).
        attn_out_path: vector=function_vector: the attention output projection, relative to a block (e.g.
            ``self_attn.o_proj``), for architectures where it is not found.
        device: as for HFLM, but defaults to CUDA when available, else the CPU.
    """

    def __init__(
        self,
        pretrained=EMBEDDED_NAME,
        mode: str = "regular",
        layer=AUTO,
        num_dummy=2,
        seed=1234,
        num_dev=50,
        layer_cache="on",
        fewshot_delimiter: str | None = None,
        theta_path: str | None = None,
        layers_path: str | None = None,
        method: str = "hendel",
        vector: str | None = None,
        op: str | None = None,
        scale=None,
        top_heads=10,
        attn_out_path: str | None = None,
        num_mean_prompts=None,
        num_aie_prompts=None,
        device: str | None = None,
        **kwargs,
    ) -> None:
        self.mode = check_mode(mode)
        settings = Settings.read(
            layer=layer,
            num_dummy=num_dummy,
            seed=seed,
            num_dev=num_dev,
            layer_cache=layer_cache,
            fewshot_delimiter=fewshot_delimiter,
            layers_path=layers_path,
            theta_path=theta_path,
            method=method,
            vector=vector,
            op=op,
            scale=scale,
            top_heads=top_heads,
            attn_out_path=attn_out_path,
            num_mean_prompts=num_mean_prompts,
            num_aie_prompts=num_aie_prompts,
        )
        given = [f"{k}={v}" for k, v in (("method", method), ("vector", vector), ("op", op), ("scale", scale))]
        given = [g for g in given if not g.endswith("=None") and g != "method=hendel"]
        if settings.theta_path and given:
            raise ValueError(
                f"theta_path= applies each stored θ the way it was exported (its file records method, op and scale): "
                f"leave out {', '.join(given)}"
            )
        if settings.theta_path and self.mode != "hypothesis":
            raise ValueError(
                f"theta_path= patches stored task vectors, which only mode=hypothesis does (got mode={mode})"
            )
        if pretrained == EMBEDDED_NAME:
            pretrained = embedded_model_path()
        self.embedded = embedded_record(pretrained) if isinstance(pretrained, str) else None  # what "embedded" is
        self._warned: set[str] = set()
        super().__init__(pretrained=pretrained, device=_device(device), **kwargs)
        if self.backend != "causal":
            raise ValueError("hf-taskvec supports decoder-only (causal) models, got backend=seq2seq")
        self.blocks = find_blocks(self.model, settings.layers_path)
        if settings.layer != AUTO:
            settings = replace(settings, layer=resolve_layer(settings.layer, len(self.blocks)))
        if settings.vector == "function_vector":  # refused now, not after the first task's dev sweep
            find_attention_outputs(self.model, self.blocks, settings.attn_out_path, settings.top_heads)
        self.settings = settings
        self.thetas = ThetaStore(
            self.model, self.blocks, self.tok_encode, lambda: self.extract_batch_size, self.autocast, self.rank == 0
        )
        stored = load_thetas(settings.theta_path, self) if settings.theta_path else None
        if stored is not None:
            self.settings = settings = replace(settings, **made_with(stored))
        self.planner = Planner(settings, self, self.thetas, stored, self.warn_once)
        self.choice_cache = LayerCache(settings.layer_cache, self.warn_once)
        self.layer_choices: dict[str, dict] = {}  # task -> layer=auto's choice, for the results JSON
        self.function_vectors: dict[str, dict] = {}  # task -> its function vector's top heads, for the results JSON
        self.theta_tokens: dict[str, dict[str, str]] = {}  # chat task -> request type -> the token θ is written at
        self._shown: set[tuple[str, str]] = set()  # (task, request type) whose first query-only prompt was logged
        self.handoff = Handoff()
        self.shared = SharedModes()
        if self.mode != "regular" and Path(sys.argv[0]).name in ("lm_eval", "lm-eval"):
            atexit.register(_print_reading_note, self.mode)  # the lm_eval command prints its table last

    def set_mode(self, mode: str, shared_modes: tuple[str, ...] | None = None) -> None:
        """Evaluate in ``mode`` from now on; ``shared_modes`` names the modes this model will evaluate in turn
        (regular then prepares θ, hypothesis forks baseline's answers). Clears what the last run left, except
        baseline answers forked for the baseline run."""
        self.mode = check_mode(mode)
        if shared_modes is not None:
            self.shared.modes = tuple(check_mode(m) for m in shared_modes)
        if self.mode != "baseline":
            self.shared.forked_baseline.clear()
        self.handoff = Handoff()

    def set_method(self, method: str) -> None:
        """Patch as ``method`` (its preset parts) from now on: ``taskvec compare --methods`` runs each method's
        hypothesis with one model, whose θ of each prompt serve every method that patches them."""
        if self.settings.theta_path:
            raise ValueError(f"method={method}: theta_path= applies each stored θ the way it was exported")
        settings = replace(self.settings, **read_method(method))
        if settings.vector == "function_vector":
            find_attention_outputs(self.model, self.blocks, settings.attn_out_path, settings.top_heads)
        self.settings = self.planner.settings = settings

    def warn_once(self, message: str, logger: logging.Logger = log) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    # ------------------------------------------------------------------ plans, θ and the layer
    def plan(self, requests, layer: int | None = None) -> list[Plan]:
        """Plans for this mode, with θ computed: in hypothesis mode each at ``layer``, or at the task's block."""
        if self.mode == "baseline":
            return self.planner.plan(requests, with_theta=False)
        plans = self.planner.plan(requests, layer_of=self._layer_of(requests, layer))
        if self.settings.vector != "prompt":
            ones = {name: self._task_key(name) for name in sorted({str(r.task_name) for r in requests})}
            plans = [
                replace(p, theta_key=ones[str(r.task_name)]) if p.theta_key is not None else p
                for r, p in zip(requests, plans)
            ]
        if self.mode == "hypothesis":
            self._show_queries(requests, plans)
        tasks = ", ".join(sorted({str(r.task_name) for r in requests}))
        self.thetas.ensure({(p.layer, p.theta_key) for p in plans if p.theta_key is not None}, f"{tasks}: extracting θ")
        return plans

    def _task_key(self, task_name: str):
        """The key of a task's one θ (vector=task_mean or function_vector); a function vector's heads are kept
        for the results JSON."""
        if self.settings.vector == "task_mean":
            return task_mean_key(self, task_name)
        key, record = function_vector_of(self, task_name)
        self.function_vectors[task_name] = {k: record[k] for k in (*function_vector.RECORDED, "source") if k in record}
        return key

    def _show_queries(self, requests, plans: list[Plan]) -> None:
        """Once per task and request type: log the first query-only prompt (shortened) and the token θ is
        written at, so that a user can check the split by eye; a chat task's token goes into the results JSON."""
        for request, plan in zip(requests, plans):
            seen = (request.task_name, request.request_type)
            if not plan.query or seen in self._shown:
                continue
            self._shown.add(seen)
            if request.request_type == "generate_until":
                ids = self.tok_encode(plan.query)
            else:
                ids = self._encode_planned(plan.query, request.args[1])[0]
            token = self.tok_decode(ids[-1:], skip_special_tokens=False)
            if uses_chat(LOADED_TASKS.get(request.task_name)):
                self.theta_tokens.setdefault(request.task_name, {})[request.request_type] = token
            shown = plan.query if len(plan.query) <= 300 else f"{plan.query[:100]} [...] {plan.query[-180:]}"
            log.info(
                "hf-taskvec mode=hypothesis, task %s (%s): the model runs the query alone, θ written at its last "
                "token %r; document %s's prompt: %r",
                request.task_name,
                request.request_type,
                token,
                request.doc_id,
                shown,
            )

    def _layer_of(self, requests, layer: int | None):
        """Block L per request: ``layer`` for all, or the task's (chosen now if need be); a stored θ has its own."""
        if layer is not None:
            return lambda request: layer
        if self.planner.stored is not None:
            return None
        self.choose_layers({r.task_name for r in requests})
        return self.layer_for

    def layer_for(self, request) -> int:
        """Block L for a request: the fixed layer, or layer=auto's choice for its task (per fold if cross-fitted)."""
        if self.settings.layer != AUTO:
            return self.settings.layer
        return layer_of_document(self.layer_choices[request.task_name], document_index(request))

    def choose_layers(self, task_names) -> None:
        """Run (or recall) layer=auto's choice for each task, before its requests are planned."""
        if self.settings.layer == AUTO:
            for name in sorted(set(task_names)):
                self.layer_choices[name] = select_layer(self, name)

    def patched(self, plans: list[Plan], positions, first_call_only: bool = False):
        """Apply each row's plan (its θ at its layer) at its position: see ``layers.intervene``."""
        return intervene(self.blocks, self.planner.interventions(plans), positions, first_call_only)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's rendering, with the turns recorded: a chat context then maps back to its turns (``chat``)."""
        rendered = super().apply_chat_template(chat_history, add_generation_prompt)
        record_chat(rendered, chat_history)
        return rendered

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """HFLM's tokenization of a likelihood request (a trailing space of the context moves onto the continuation)."""
        return self._encode_pair(context, continuation)

    @property
    def extract_batch_size(self) -> int:
        """Prompts per extraction batch: the user's batch size, or EXTRACT_BATCH_SIZE under batch_size=auto."""
        return self.batch_size_per_gpu if isinstance(self.batch_size_per_gpu, int) else EXTRACT_BATCH_SIZE

    def autocast(self):
        return torch.autocast(
            self.device.type, self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
        )

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._warn_instruct(requests)
        check_run(self, requests)
        if self.mode == "regular" and "hypothesis" in self.shared.modes and self.settings.vector == "prompt":
            # The full prompts [S, x] and θ's prompts [S, x'] share S: run it once for both.
            plans = self.planner.plan(requests, layer_of=self._layer_of(requests, None))
            return self.generate_planned(
                requests,
                [replace(p, query=r.args[0], prepare_theta=True) for r, p in zip(requests, plans)],
                disable_tqdm,
            )
        if self.mode == "regular":
            new_tokens = max(int(r.args[1].get("max_gen_toks") or self.max_gen_toks) for r in requests)
            with self.handoff.during(probe_tokens=self._longest(r.args[0] for r in requests) + new_tokens):
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
        if self.mode == "hypothesis":
            self.shared.forked_baseline.clear()
            for request in requests:
                if problem := beam_refusal(request):
                    raise ValueError(problem)
        return self.generate_planned(requests, self.plan(requests), disable_tqdm)

    def generate_planned(self, requests, plans: list[Plan], disable_tqdm: bool = False) -> list[str]:
        """Generate for each request from its plan's query text, with its plan's θ (if any) patched at the
        query's last token in the prompt's forward pass."""
        new_tokens = max(int(r.args[1].get("max_gen_toks") or self.max_gen_toks) for r in requests)
        full = self._longest(r.args[0] for r in requests) + new_tokens
        short = self._longest(p.query for p in plans) + new_tokens

        def generate_part(part: list[int]) -> list[str]:
            by_context = {requests[i].args[0]: plans[i] for i in part}
            with self._grown_batches(full, short), self.handoff.during(plans_by_context=by_context, probe_tokens=short):
                return super(TaskVectorLM, self).generate_until([requests[i] for i in part], disable_tqdm)

        # Each part maps a context string to one plan (the same context from two tasks may differ in θ).
        return in_parts(len(requests), lambda i: requests[i].args[0], lambda i: plans[i], generate_part)

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        if self.handoff.plans_by_context is None:
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        if padding_side != "left":
            raise RuntimeError("hf-taskvec patches the last column of a left-padded batch")
        plans = [self.handoff.plans_by_context[s] for s in strings]
        if any(p.theta_key is not None for p in plans):
            self.handoff.batch_plans = plans
        return super().tok_batch_encode([p.query for p in plans], padding_side, left_truncate_len, truncation)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        plans = self.handoff.take_batch_plans()
        key = batch_key(context, max_length, stop)
        if plans is None:
            if key in self.shared.forked_baseline:  # computed alongside hypothesis, from the same query prefill
                return self.shared.forked_baseline.pop(key)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if any(p.prepare_theta for p in plans):  # regular, preparing θ: stock generation, then θ from its KV cache
            cache = DynamicCache(config=self.model.config)
            answers = super()._model_generate(
                context, max_length, stop, **generation_kwargs, **{cache_argument(self.model): cache}
            )
            rows = [(p.layer, p.theta_key) if p.theta_key is not None else None for p in plans]
            self.thetas.fill_from_cache(cache, context, generation_kwargs["attention_mask"], rows)
            return answers
        if self.mode == "hypothesis" and "baseline" in self.shared.modes and context.shape[1] > 1:
            # Baseline and hypothesis run the same query tokens and differ from the last one on: prefill the
            # rest once, then generate each from a copy of that cache; baseline's answers wait for the baseline
            # run. Two calls, not one of twice the rows: each stops when its own rows reach `until` (patched
            # rows often stop after a word where the query alone keeps talking).
            with torch.no_grad(), self.autocast():
                prefix = prefill_columns(
                    self.model, context[:, :-1], generation_kwargs["attention_mask"][:, :-1], stop_block=self.blocks[-1]
                )
            rows = list(range(context.shape[0]))
            with self.patched(plans, -1, first_call_only=True):
                answers = super()._model_generate(
                    context,
                    max_length,
                    stop,
                    **generation_kwargs,
                    **{cache_argument(self.model): prefix.take(rows).cache},
                )
            self.shared.forked_baseline[key] = super()._model_generate(
                context, max_length, stop, **generation_kwargs, **{cache_argument(self.model): prefix.take(rows).cache}
            )
            return answers
        with self.patched(plans, -1, first_call_only=True):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._warn_instruct(requests)
        check_run(self, requests)
        if self.mode == "regular":
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self.loglikelihood_planned(requests, self.plan(requests), disable_tqdm)

    def loglikelihood_planned(self, requests, plans: list[Plan], disable_tqdm: bool = False):
        """Score each request's continuation after its plan's query, with its plan's θ (if any) patched at the
        query's last token."""
        encoded = [(req.args, *self._encode_planned(plan.query, req.args[1])) for req, plan in zip(requests, plans)]
        full = self._longest(r.args[0] for r in requests) + max(len(e[2]) for e in encoded)
        with self._grown_batches(full, max(len(e[1]) + len(e[2]) for e in encoded)):
            if all(p.theta_key is None for p in plans):
                return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)
            rows = [self._row_patch(ctx, cont, plan) for (_, ctx, cont), plan in zip(encoded, plans)]

            def score_part(part: list[int]) -> list:
                with self.handoff.during(row_patches={rows[i][0]: rows[i][1] for i in part}):
                    return self._loglikelihood_tokens([encoded[i] for i in part], disable_tqdm=disable_tqdm)

            # Each part maps a row's tokens to one (θ, layer, position), so _model_call can tell rows apart exactly.
            return in_parts(len(encoded), lambda i: rows[i][0], lambda i: rows[i][1], score_part)

    def _encode_planned(self, query: str, continuation: str) -> tuple[list[int], list[int]]:
        """A request's tokens as HFLM.loglikelihood makes them: an empty context (acc_mutual_info's unconditional
        requests, which hold no query and run unpatched) is the prefix token alone."""
        if query:
            return self.encode_pair(query, continuation)
        continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
        if self.prefix_token_id != continuation_enc[0]:
            return [self.prefix_token_id], continuation_enc
        return continuation_enc[:1], continuation_enc[1:]

    def _row_patch(self, context_enc: list[int], continuation_enc: list[int], plan: Plan):
        """The row HFLM will build for this request (trailing zeros stripped: padding is zeros), and where θ goes."""
        tokens = context_enc + continuation_enc
        cut = max(0, len(tokens) - (self.max_length + 1))  # HFLM truncates from the left
        position = len(context_enc) - 1 - cut
        if position < 0:
            raise ValueError("continuation longer than the model's context: the query was truncated away")
        return row_key(tokens[cut:-1]), (plan, position)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.handoff.row_patches is None:
            return super()._model_call(inps, attn_mask, labels)
        plans, positions = zip(*(self.handoff.row_patches[row_key(row)] for row in inps.tolist()))
        with self.patched(list(plans), torch.tensor(positions)):
            return super()._model_call(inps, attn_mask, labels)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._warn_instruct(requests)
        check_run(self, requests)
        if self.mode != "regular":
            raise ValueError(rolling_refusal(self.mode))
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    # ------------------------------------------------------------------ batching
    @contextmanager
    def _grown_batches(self, full_tokens: int, short_tokens: int):
        """Query-only rows are shorter than the few-shot rows ``batch_size`` was chosen for: batch more of them
        while keeping the tokens per batch (and so memory) within what the user's batch size allows."""
        saved = self.batch_size_per_gpu
        if isinstance(saved, int):
            self.batch_size_per_gpu = saved * max(1, min(MAX_BATCH_GROWTH, full_tokens // max(1, short_tokens)))
            if self.batch_size_per_gpu > saved and "grown batches" not in self._warned:
                self._warned.add("grown batches")
                log.info(
                    "hf-taskvec mode=%s: query-only rows are shorter than the few-shot rows batch_size=%d was chosen "
                    "for, so their batches hold up to %d times as many rows (here %d) for the same tokens per batch: "
                    "batch_size is not the number of rows per batch in this mode",
                    self.mode,
                    saved,
                    MAX_BATCH_GROWTH,
                    self.batch_size_per_gpu,
                )
        try:
            yield
        finally:
            self.batch_size_per_gpu = saved

    def _longest(self, texts) -> int:
        return len(self.tok_encode(max(texts, key=len)))

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """batch_size=auto. HFLM probes generation at max_length (8192 tokens for SmolLM2: 16 GB on a CPU);
        we probe with the longest real prompt. On a CPU there is no out-of-memory error to back off from, so
        the probe would only grow until the machine swaps: use a fixed size instead and say so."""
        if self.device.type == "cpu":
            size = min(self.max_batch_size or CPU_AUTO_BATCH_SIZE, CPU_AUTO_BATCH_SIZE)
            self.warn_once(
                f"batch_size=auto on the CPU: no out-of-memory signal to probe with, so batch size {size} "
                "(set one with --batch_size N)"
            )
            return size
        if requests is None and self.handoff.probe_tokens is not None:
            requests, pos = [(None, [0] * self.handoff.probe_tokens, [0])], 0  # HFLM's probe: context + cont - 1
        saved, self.handoff.row_patches = self.handoff.row_patches, None  # its probe batches are not requests
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self.handoff.row_patches = saved

    # ------------------------------------------------------------------ what the run records and says
    def _warn_instruct(self, requests) -> None:
        """lm-eval warns when the model args name an instruct or chat model, as --model hf does for SmolLM2's
        folder; "embedded" hides the name, so say it here, unless the requests' tasks used a chat template."""
        chat = any(uses_chat(LOADED_TASKS.get(r.task_name)) for r in requests)
        if self.embedded and not chat:
            self.warn_once(
                f"pretrained=embedded ({self.embedded['model']}) appears to be an instruct or chat variant "
                "but chat template is not applied. Recommend setting `apply_chat_template` (optionally "
                "`fewshot_as_multiturn`).",
                logging.getLogger("lm_eval.evaluator"),
            )

    def set_cache_hook(self, cache_hook) -> None:
        """``--use_cache`` keys answers on the request alone: refuse a database another mode or setting wrote."""
        database = getattr(cache_hook, "dbdict", None)
        if database is not None:
            mine = json.dumps(self.answer_settings(), sort_keys=True)
            stored = database.get(CACHE_MARKER)
            if stored is None and len(database) and self.mode != "regular":
                stored = "answers of another model (none of hf-taskvec's marks)"
            if stored is not None and stored != mine:
                raise ValueError(
                    f"--use_cache {database.filename} holds {stored}, and this run is {mine}: lm-eval keys cached "
                    "answers on the request alone, so each mode and setting needs its own --use_cache path"
                )
            database[CACHE_MARKER] = mine
        super().set_cache_hook(cache_hook)

    def answer_settings(self) -> dict:
        """Everything besides the request that decides an answer (the model itself is the user's cache path)."""
        settings = {"model": "hf-taskvec", "mode": self.mode}
        if self.mode == "hypothesis":
            stored = self.planner.stored
            settings |= {
                "layer": self.settings.layer,
                "num_dummy": self.settings.num_dummy,
                "seed": self.settings.seed,
                "num_dev": self.settings.num_dev,
                "theta_path": stored and stored.path,
            }
            if self.settings.parts != METHODS["hendel"]:  # Hendel's databases keep their marks
                settings |= dict(zip(("vector", "op", "scale"), self.settings.parts))
            if self.settings.vector == "function_vector":
                settings |= {"top_heads": self.settings.top_heads, "attn_out_path": self.settings.attn_out_path}
                counts = {
                    "num_mean_prompts": self.settings.num_mean_prompts,
                    "num_aie_prompts": self.settings.num_aie_prompts,
                }
                settings |= {k: v for k, v in counts.items() if v is not None}
        return settings

    def get_model_info(self) -> dict:
        """Goes into the results JSON's ``config``: the mode and, in hypothesis mode, the layer per task."""
        info = super().get_model_info()
        info["model_device"] = str(self.device)  # lm-eval's "device" records the CLI's string, e.g. "cuda:0" on a CPU
        info["taskvec"] = {"mode": self.mode}
        stored, settings = self.planner.stored, self.settings
        if self.mode == "hypothesis":
            info["taskvec"] |= {"method": settings.method, "vector": settings.vector, "op": settings.op}
            info["taskvec"] |= {"scale": settings.scale} if settings.op == "add" else {}
            if settings.vector == "function_vector":
                info["taskvec"] |= {"top_heads": settings.top_heads, "function_vector": self.function_vectors}
        if self.mode == "hypothesis" and stored is not None:
            info["taskvec"] |= {"layer": settings.layer, "theta_path": stored.path, "theta_source": stored.model}
        elif self.mode == "hypothesis":
            info["taskvec"] |= {
                "layer": settings.layer,
                "num_dummy": settings.num_dummy,
                "seed": settings.seed,
                "layer_selection": self.layer_choices,
            }
        if self.mode == "hypothesis" and self.theta_tokens:  # chat prompts: the last token of the rendered prompt
            info["taskvec"]["theta_token"] = self.theta_tokens
        if self.embedded:  # lm-eval's model_sha is a Hub commit; ours is the hash of the file we converted
            info |= {
                "model_revision": self.embedded["package"],
                "model_sha": self.embedded["gguf_sha256"],
                "embedded_model": self.embedded,
            }
        return info


def reading_note(mode: str) -> str | None:
    """One line for under lm-eval's table, which lists a task's metrics alphabetically (exact_match first): the
    tasks with the paper's first-answer score are read by it in the modes that run the query alone."""
    tasks = sorted(
        name
        for name, task in LOADED_TASKS.items()
        if any(m.get("metric") == "paper_match" for m in task.config.metric_list or [])
    )
    if not tasks:
        return None
    shown = ", ".join(tasks[:3]) + (f" and {len(tasks) - 3} more" if len(tasks) > 3 else "")
    return (
        f"hf-taskvec mode={mode}: read paper_match for {shown}, the paper's first-answer score; exact_match "
        "counts the whole line, and a model given the query alone often keeps talking after a right first word"
    )


def _print_reading_note(mode: str) -> None:
    if note := reading_note(mode):
        print(note)


def _device(device: str | None) -> str:
    """CUDA when available, else the CPU, unless a device is given. HFLM alone defaults to "cuda" (a crash on
    CPU-only machines); lm_eval's CLI sends "cuda:0" when --device is left out, which counts as not given."""
    if device is None or (device == "cuda:0" and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
