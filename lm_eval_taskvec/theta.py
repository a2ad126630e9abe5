"""θ: what identifies one (``ThetaKey``), the one place θ are kept (``ThetaStore``), and the public API the
analyses use: few-shot requests built by lm-eval's own task objects and θ at any blocks.

    requests = few_shot_requests(task, docs, num_fewshot=4, seed=0)   # one list of Instances per document
    thetas = task_vectors(lm, [r[0] for r in requests], layers=[15])  # Tensor[layers, requests, hidden]
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lm_eval_taskvec.extraction import Prefix, common_prefix_length, last_token_states, states_after, within_window


@dataclass(frozen=True)
class ThetaKey:
    """Identifies θ: the prompts [S, x'] exactly as the regular path would tokenize them."""

    demos: str
    dummies: tuple[str, ...]
    strip: bool  # likelihood requests: trailing whitespace of the context moves onto the continuation
    max_tokens: int | None = None  # left-truncate each prompt to this many tokens, as regular mode does
    stored: str | None = None  # θ read from a theta_path file ("path#task@layer"), not extracted
    texts: tuple[str, ...] = ()  # θ's prompts in full where they are not demos + dummy (chat: rendered turns)
    mean_of: tuple[ThetaKey, ...] = ()  # a task's θ (vector=task_mean): the mean of these keys' θ
    function_vector: str | None = None  # a task's function vector, by its cache key: put, never extracted

    @classmethod
    def task_mean(cls, keys) -> ThetaKey:
        """The key of the mean θ over ``keys`` (one task's prompts), in an order of its own."""
        members = tuple(sorted(set(keys), key=lambda key: _order((0, key))))
        if not members or any(m.mean_of or m.stored for m in members):
            raise ValueError("a task-mean θ is the mean of extracted prompts' θ: give at least one such key")
        return cls("", (), members[0].strip, mean_of=members)


class ThetaStore:
    """Every θ of one model, by (layer, key): filled by extraction passes (``ensure``), from the KV cache of a
    regular generation (``fill_from_cache``) or from a file (``put``); nothing else holds θ.

    Args:
        model, blocks: the model and its decoder blocks.
        encode: text -> token ids, as the model's regular path tokenizes a context.
        batch_size: prompts per extraction pass (read at each pass: the user's batch size may change).
        autocast: a context manager for the model's mixed precision.
        progress: whether to show progress bars (rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        encode: Callable[[str], list[int]],
        batch_size: Callable[[], int],
        autocast: Callable[[], AbstractContextManager],
        progress: bool = True,
    ):
        self.model, self.blocks, self.encode = model, blocks, encode
        self.batch_size, self.autocast, self.progress = batch_size, autocast, progress
        self._thetas: dict[tuple[int, ThetaKey], torch.Tensor] = {}

    def __contains__(self, item: tuple[int, ThetaKey]) -> bool:
        return item in self._thetas

    def __len__(self) -> int:
        return len(self._thetas)

    def get(self, layer: int, key: ThetaKey) -> torch.Tensor:
        """θ of ``key`` at block ``layer``: Tensor[hidden]."""
        return self._thetas[(layer, key)]

    def put(self, layer: int, key: ThetaKey, theta: torch.Tensor) -> None:
        """Keep ``theta`` unless the store already holds one for (layer, key): the first computation wins."""
        self._thetas.setdefault((layer, key), theta)

    def missing(self, wanted) -> set[tuple[int, ThetaKey]]:
        """The (layer, key) pairs of ``wanted`` the store does not hold yet."""
        return {item for item in wanted if item not in self._thetas}

    def clear(self) -> None:
        self._thetas.clear()

    def prompts(self, key: ThetaKey) -> list[list[int]]:
        """Tokens of [S, x'] for each dummy x', tokenized (and truncated) as the regular path does."""
        texts = list(key.texts) or [key.demos + dummy for dummy in key.dummies]
        tokens = [self.encode(text.rstrip() if key.strip else text) for text in texts]
        return [t[-key.max_tokens :] for t in tokens] if key.max_tokens else tokens

    def ensure(self, wanted, desc: str = "Extracting task vectors") -> None:
        """Compute every missing θ of ``wanted`` ((layer, key) pairs): one extraction pass per set of layers
        (a sweep needs all blocks of each [S, x'] prompt; an evaluation needs one layer per task, and stops
        there). θ is the mean over the dummies, accumulated in float32 and kept in the model's dtype. The passes
        are laid out in an order of their own, not ``wanted``'s (a set's order changes with Python's string hashing
        from process to process, and with it which prompts share a batch, and so θ's last bits). A task-mean key's
        θ is the float32 mean of its members' θ, extracted first. A function vector is put by
        ``selection.function_vector`` at every block before it is asked for."""
        if missing := sorted(key.function_vector for layer, key in self.missing(wanted) if key.function_vector):
            raise RuntimeError(f"function vector {missing[0]} was asked for before selection.function_vector put it")
        task_means = {item for item in wanted if item[1].mean_of and item not in self._thetas}
        wanted = {item for item in wanted if not item[1].mean_of} | {
            (layer, member) for layer, key in task_means for member in key.mean_of
        }
        layers_of: dict[ThetaKey, set[int]] = defaultdict(set)
        for layer, key in sorted(wanted, key=_order):
            if (layer, key) not in self._thetas:
                layers_of[key].add(layer)
        passes: dict[tuple[int, ...], list[ThetaKey]] = defaultdict(list)
        for key, layers in layers_of.items():
            passes[tuple(sorted(layers))].append(key)
        for layers, keys in passes.items():
            states = self.last_token_states([self.prompts(key) for key in keys], list(layers), desc)
            means = states.float().mean(2).to(states.dtype)
            for li, layer in enumerate(layers):
                for ki, key in enumerate(keys):
                    self._thetas[(layer, key)] = means[li, ki]
        for layer, key in sorted(task_means, key=_order):
            members = torch.stack([self._thetas[(layer, member)] for member in key.mean_of])
            self._thetas[(layer, key)] = members.float().mean(0).to(members.dtype)

    def last_token_states(
        self, families: list[list[list[int]]], layers: list[int], desc: str = "Extracting task vectors"
    ) -> torch.Tensor:
        """Block outputs at the last token of each prompt: Tensor[layers, families, prompts per family, hidden]."""
        with self.autocast():
            return last_token_states(self.model, self.blocks, families, layers, self.batch_size(), self.progress, desc)

    def fill_from_cache(
        self, cache, context: torch.Tensor, mask: torch.Tensor, rows: list[tuple[int, ThetaKey] | None]
    ) -> None:
        """θ of each row's (layer, key) from the KV cache of a regular batch's generation, so that S runs once:
        in a copy of the cache, each row's dummies see only the tokens the row shares with its dummy prompts
        [S, x'] (the columns after them, query and answer, become masked holes) and run only their own tokens.
        Under a sliding window shorter than the cache, holes would move the window: nothing is filled, and
        hypothesis mode extracts θ itself. ``context`` and ``mask`` are the batch's left-padded prompt."""
        todo = [r for r, item in enumerate(rows) if item is not None and item not in self._thetas]
        families = {r: self.prompts(rows[r][1]) for r in todo}
        width = cache.get_seq_length()
        if not todo or not within_window(self.model, width + max(len(t) for f in families.values() for t in f)):
            return
        pads = (mask == 0).sum(-1)
        cuts = {r: common_prefix_length([context[r, pads[r] :].tolist(), *families[r]]) for r in todo}
        ends = pads + torch.tensor([cuts.get(r, 0) for r in range(len(rows))], device=mask.device)
        columns = torch.arange(width, device=mask.device)
        seen = ((columns >= pads[:, None]) & (columns < ends[:, None])).to(mask.dtype)  # each row's S alone
        members = [r for r in todo for _ in families[r]]
        suffixes = [prompt[cuts[r] :] for r in todo for prompt in families[r]]
        layers = sorted({rows[r][0] for r in todo})
        with torch.no_grad(), self.autocast():
            found = states_after(self.model, self.blocks, Prefix(cache, seen).take(members), suffixes, layers)
        for i, r in enumerate(todo):
            k = len(families[r])
            states = found[rows[r][0]][i * k : (i + 1) * k]
            self._thetas[rows[r]] = states.float().mean(0).to(states.dtype)


def _order(item: tuple[int, ThetaKey]) -> tuple:
    layer, key = item
    members = tuple(_order((0, member))[1:] for member in key.mean_of)
    return (
        layer,
        key.demos,
        key.dummies,
        key.strip,
        key.max_tokens or 0,
        key.stored or "",
        key.texts,
        members,
        key.function_vector or "",
    )


def _prompt_options(task) -> dict:
    """The run's system instruction and chat settings, as ``fewshot_context`` takes them."""
    settings = getattr(task, "taskvec_prompt_settings", None) or {}
    return {
        "system_instruction": settings.get("system_instruction"),
        "apply_chat_template": bool(settings.get("apply_chat_template")),
        "fewshot_as_multiturn": bool(settings.get("fewshot_as_multiturn")),
        "chat_template": getattr(task, "taskvec_chat_template", None),
    }


def few_shot_requests(
    task, docs: list[tuple[int, dict]], num_fewshot: int, seed: int, desc: str | None = None
) -> list[list]:
    """lm-eval's own requests for each ``(doc_id, doc)``: its few-shot context (with the run's system
    instruction and chat template) built with demonstrations drawn from ``seed`` that never include the
    document itself; ``desc`` names a progress bar (lm-eval takes tens of milliseconds per context)."""
    chat = _prompt_options(task)
    out = []
    with _seeded_demos_without(task, seed) as exclude:
        for doc_id, doc in tqdm(docs, desc=desc, disable=desc is None):
            exclude(doc)
            context = task.fewshot_context(doc, num_fewshot, gen_prefix=task.doc_to_prefix(doc), **chat)
            requests = task.construct_requests(
                doc=doc,
                ctx=context,
                metadata=(task.config.task, doc_id, 1),
                apply_chat_template=chat["apply_chat_template"],
                chat_template=chat["chat_template"],
            )
            out.append([r for r in (requests if isinstance(requests, list) else [requests]) if r.args[0]])
    return out


def shuffled_label_contexts(task, docs: list[tuple[int, dict]], num_fewshot: int, seed: int) -> list[tuple[str, str]]:
    """Per ``(doc_id, doc)``: its few-shot context as ``few_shot_requests`` renders it (the same demonstrations,
    drawn from ``seed`` in the same order), and that context with the demonstrations' targets shuffled among
    them as text (seeded per document), rendered by lm-eval itself: the corrupted prompts function vectors rank
    heads on."""
    chat = _prompt_options(task)
    target_of, out = task.doc_to_target, []
    with _seeded_demos_without(task, seed) as exclude:
        drawn = task.sampler.sample
        try:
            for doc_id, doc in docs:
                exclude(doc)
                demos = list(drawn(num_fewshot))
                order = list(range(len(demos)))
                random.Random(f"{seed}|shuffled labels|{doc_id}").shuffle(order)
                task.sampler.sample = lambda n, eval_doc=None, _demos=demos, **kwargs: _demos
                clean = task.fewshot_context(doc, num_fewshot, gen_prefix=task.doc_to_prefix(doc), **chat)
                targets = [_demo_answer(task, d) for d in demos]
                seen = []

                def shuffled(d, *field, _demos=demos, _targets=targets, _order=order, _seen=seen):
                    if not field or len(_seen) == len(_demos) or d is not _demos[len(_seen)]:
                        return target_of(d, *field)  # the query's own target (a demonstration's has its field)
                    _seen.append(d)
                    return _targets[_order[len(_seen) - 1]]

                task.doc_to_target = shuffled
                try:
                    corrupted = task.fewshot_context(doc, num_fewshot, gen_prefix=task.doc_to_prefix(doc), **chat)
                finally:
                    del task.doc_to_target
                if len(seen) != len(demos):
                    raise RuntimeError(f"task {task.config.task!r}: could not shuffle the demonstrations' targets")
                out.append((clean, corrupted))
        finally:
            task.sampler.sample = drawn
    return out


def _demo_answer(task, doc) -> str:
    """The text a demonstration of ``doc`` answers with, as lm-eval's ``build_qa_turn`` picks it (a choice by
    index, the first of several targets, or the target itself): shuffled as text, a label means the same
    whichever demonstration it lands on."""
    config = task.fewshot_cfg
    answer = task.doc_to_target(doc, config.doc_to_target)
    choices = task.doc_to_choice(doc, config.doc_to_choice) if config.doc_to_choice else None
    if choices and isinstance(answer, int):
        return choices[answer]
    return answer[0] if isinstance(answer, list) else answer


@contextmanager
def _seeded_demos_without(task, seed: int):
    """Demonstrations drawn with a fixed seed, never the document being prompted (lm-eval's sampler drops it
    only when the few-shot split is the test split); the run's own sampler state is restored after."""
    sampler, saved = task.sampler, task.sampler.rnd
    sample, current = sampler.sample, {}
    sampler.set_rnd(seed)
    sampler.sample = lambda n, eval_doc=None, **kwargs: sample(n, eval_doc=current["doc"], **kwargs)
    try:
        yield lambda doc: current.update(doc=doc)
    finally:
        del sampler.sample
        sampler.rnd = saved


def task_vectors(lm, requests: list, layers: list[int]) -> torch.Tensor:
    """θ of each request at each of ``layers``, from one extraction pass.

    Args:
        lm: an hf-taskvec model (its planner splits S and x and draws the dummies; its store keeps θ).
        requests: lm-eval requests with few-shot contexts (e.g. from ``few_shot_requests``).
        layers: 0-based blocks.
    Returns:
        Tensor[len(layers), len(requests), hidden]: block outputs at the last token of [S, x'], averaged over
        each request's dummies.
    """
    plans = lm.planner.plan(requests)
    lm.thetas.ensure({(layer, plan.theta_key) for plan in plans for layer in layers})
    return torch.stack([torch.stack([lm.thetas.get(layer, plan.theta_key) for plan in plans]) for layer in layers])
