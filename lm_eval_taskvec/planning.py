"""What each lm-eval request becomes: the query the model sees and, for θ, its demonstrations, dummies and layer.

S and x come from lm-eval's own task object (``contexts``; under a chat template, from its turns: ``chat``);
the dummies x' are other documents' rendered queries of the same task (chat: their query turns), drawn from
every evaluated document (so they depend neither on ``--limit`` nor on the process); a ``Plan`` is a value
that names its θ by key, and ``Planner.interventions`` turns plans into the interventions a forward pass
applies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lm_eval_taskvec import chat
from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.contexts import Split, choose_dummies, rendered_queries, split_at_delimiter, split_for_task
from lm_eval_taskvec.layers import Intervention
from lm_eval_taskvec.settings import AUTO, Settings
from lm_eval_taskvec.theta import ThetaKey, ThetaStore
from lm_eval_taskvec.thetafile import ThetaFile


@dataclass(frozen=True)
class Plan:
    """What one request becomes: the text the model sees and, in hypothesis mode, which θ goes where."""

    query: str  # the query alone (hypothesis, baseline), or the full prompt when preparing θ
    theta_key: ThetaKey | None = None
    layer: int | None = None  # block L; None until a layer is chosen
    prepare_theta: bool = False  # regular mode: run ``query`` unpatched and keep θ from its KV cache for later


def document_index(request) -> int:
    """The request's document as an index into its task's evaluated documents. Under ``--samples`` lm-eval
    numbers ``Instance.doc_id`` by position among the sampled documents (in document order) and maps it back
    only for logging; every other run's doc_id is the index itself."""
    samples = getattr(LOADED_TASKS.get(request.task_name), "taskvec_samples", None)
    return sorted(set(samples))[request.doc_id] if samples else request.doc_id


class Tokens(Protocol):
    """How the model tokenizes, as HFLM does (the model class provides these)."""

    max_length: int
    max_gen_toks: int

    def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> list[int]: ...

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]: ...

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str: ...


class Planner:
    """Splits requests into S and x, draws dummies and names each request's θ; remembers each loaded task's
    pool of rendered queries (the dummies' source)."""

    def __init__(
        self,
        settings: Settings,
        tokens: Tokens,
        thetas: ThetaStore,
        stored: ThetaFile | None,
        warn_once: Callable[[str], None],
    ):
        self.settings, self.tokens, self.thetas, self.stored, self.warn_once = (
            settings,
            tokens,
            thetas,
            stored,
            warn_once,
        )
        # task -> (task object, whether chat, its rendered queries (chat: their turns, as text))
        self._query_pools: dict[str, tuple[object, bool, set[str]]] = {}

    def plan(self, requests, with_theta: bool = True, layer_of: Callable | None = None) -> list[Plan]:
        """A plan per request: its query, and with ``with_theta`` its θ key and block (``layer_of(request)``,
        or None). θ is not computed here (``ThetaStore.ensure`` does that); a stored θ is put in the store."""
        if any(not req.args[0] for req in requests):  # acc_mutual_info's ("", choice): no query, run unpatched
            planned = iter(self.plan([r for r in requests if r.args[0]], with_theta, layer_of))
            return [next(planned) if req.args[0] else Plan("") for req in requests]
        splits = [self.split(req) for req in requests]
        for req, (split, _) in zip(requests, splits):
            self._check_query(req, split.query)
        if not with_theta:
            return [Plan(split.query) for split, _ in splits]
        if self.stored is not None:
            return [self._stored_plan(req, split) for req, (split, _) in zip(requests, splits)]
        pools: dict[str, set[str]] = defaultdict(set)
        for req, (split, _) in zip(requests, splits):
            own_query = chat.as_text(split.query_turns) if isinstance(split, chat.ChatSplit) else split.query
            pools[req.task_name] |= self.query_pool(req.task_name) or {own_query}
        plans = []
        for req, (split, own) in zip(requests, splits):
            dummies = choose_dummies(
                pools[req.task_name], own, self.settings.num_dummy, self.settings.seed, req.task_name, split.demos
            )
            plans.append(Plan(split.query, self._theta_key(req, split, dummies), layer_of(req) if layer_of else None))
        return plans

    def interventions(self, plans: list[Plan]) -> list[Intervention | None]:
        """What each plan writes into the model: its θ at its block, replaced or added as the method says (None for
        a plan without θ)."""
        _, op, scale = self.settings.parts
        return [
            Intervention(self.thetas.get(p.layer, p.theta_key), p.layer, op, scale) if p.theta_key is not None else None
            for p in plans
        ]

    def split(self, request) -> tuple[Split, tuple[str, ...]]:
        """S and x of a request, and the document's own queries (never its dummies)."""
        task = LOADED_TASKS.get(request.task_name)
        context = request.args[0]
        if task is not None and request.doc:
            shots = task.get_config("num_fewshot") or 0
            if chat.uses_chat(task):
                turns = chat.query_turns(task, request.doc)
                split = chat.split_chat(
                    context, turns, shots, request.task_name, self.tokens.apply_chat_template, self.stored is None
                )
                return split, tuple(map(chat.as_text, turns))
            own = rendered_queries(task, request.doc)
            return split_for_task(context, own, shots, request.task_name, need_demos=self.stored is None), own
        delimiter = self.settings.fewshot_delimiter
        if self.stored is not None and delimiter is None:
            return Split("", context), (context,)  # a stored θ stands in for the demonstrations
        if delimiter is None:
            raise ValueError(
                f"task {request.task_name!r} was not loaded by lm-eval in this process, so its demonstrations cannot "
                "be told from its query: evaluate it through lm_eval / lm_eval.simple_evaluate, or pass the model "
                "arg fewshot_delimiter=<the task's few-shot delimiter, e.g. \\n>"
            )
        self.warn_once(
            f"task {request.task_name!r}: not loaded by lm-eval here, so its contexts are split at the "
            f"last fewshot_delimiter={delimiter!r} (model arg)"
        )
        split = split_at_delimiter(context, delimiter)
        return split, (split.query,)

    def query_pool(self, task_name: str) -> set[str]:
        """The rendered queries of every evaluated document of a loaded task, so that dummies depend neither
        on --limit nor on how many processes share the documents; empty for tasks lm-eval did not load."""
        task = LOADED_TASKS.get(task_name)
        if task is None or not hasattr(task, "eval_docs"):
            return set()
        known = self._query_pools.get(task_name)
        if known is None or known[0] is not task or known[1] != chat.uses_chat(task):
            queries = (
                {chat.as_text(q) for doc in task.eval_docs for q in chat.query_turns(task, doc)}
                if chat.uses_chat(task)
                else {q for doc in task.eval_docs for q in rendered_queries(task, doc)}
            )
            known = self._query_pools[task_name] = (task, chat.uses_chat(task), queries)
        return known[2]

    def _stored_plan(self, request, split: Split) -> Plan:
        layer = self.settings.layer
        stored = self.stored.get(request.task_name, None if layer == AUTO else layer)
        key = ThetaKey(
            "", (), request.request_type != "generate_until", stored=f"{self.stored.path}#{stored.task}@{stored.layer}"
        )
        self.thetas.put(stored.layer, key, stored.theta)
        return Plan(split.query, key, stored.layer)

    def budget(self, request, query: str) -> int:
        """How many context tokens the regular path keeps for this request (HFLM truncates from the left)."""
        if request.request_type == "generate_until":
            return self.tokens.max_length - int((request.args[1] or {}).get("max_gen_toks") or self.tokens.max_gen_toks)
        return self.tokens.max_length + 1 - len(self.tokens.encode_pair(query, request.args[1])[1])

    def _check_query(self, request, query: str) -> None:
        strip = request.request_type != "generate_until"
        if strip and not query.rstrip():
            raise ValueError(
                f"task {request.task_name!r}: the query {query!r} is only whitespace, nothing to score after"
            )
        if request.request_type not in ("generate_until", "loglikelihood"):
            return
        length, budget = len(self.tokens.tok_encode(query.rstrip() if strip else query)), self.budget(request, query)
        if length > budget:
            raise ValueError(
                f"task {request.task_name!r}: the query alone is {length} tokens, more than the {budget} the model's "
                f"max_length={self.tokens.max_length} leaves for it; hf-taskvec never cuts the query: raise max_length"
            )

    def _theta_key(self, request, split: Split, dummies: tuple[str, ...]) -> ThetaKey:
        texts = ()
        if isinstance(split, chat.ChatSplit):  # [S, x'] rendered as turns by the model's template
            texts = tuple(
                chat.render(self.tokens.apply_chat_template, split.with_query(chat.from_text(d))) for d in dummies
            )
        key = ThetaKey(split.demos, dummies, strip=request.request_type != "generate_until", texts=texts)
        budget = self.budget(request, split.query)
        if max(map(len, self.thetas.prompts(key))) <= budget:
            return key
        self.warn_once(
            f"task {request.task_name!r}: demonstrations longer than max_length={self.tokens.max_length}; "
            "θ's prompts are left-truncated as regular mode truncates the full prompt"
        )
        return ThetaKey(key.demos, key.dummies, key.strip, budget, texts=key.texts)
