"""Chat prompts: S and x of a context lm-eval rendered through a chat template, read from its turns.

lm-eval builds each prompt as turns (an optional system turn with the system instruction and description, a
user and an assistant turn per demonstration, the query's user turn, and an assistant turn holding
``gen_prefix`` where the task has one) and hands them to the model's ``apply_chat_template``. The model records
them there (``record``), keyed by the string the template returned, so that a rendered context maps back to its
turns: the rendered string is never searched. In the single-turn shape (``--fewshot_as_multiturn false``)
lm-eval collapses demonstrations and query into one user turn, whose text ends with the query's own text.

S is every turn before the query's user turn (the system turn included, as in plain mode) and, single-turn,
the demonstrations' text that starts that turn; x is the query's user turn alone, with gen_prefix's turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from lm_eval_taskvec.contexts import Split, shots_fix

Turns = tuple[tuple[str, str], ...]  # (role, content) per turn

_RENDERED: dict[str, Turns] = {}  # a chat string the model rendered in this process -> the turns it came from


def record(rendered: str, chat_history: list[dict]) -> None:
    """Remember the turns a chat context was rendered from (called where lm-eval renders it)."""
    _RENDERED[rendered] = tuple((m["role"], m["content"]) for m in chat_history)


def uses_chat(task) -> bool:
    """Whether lm-eval built the task's requests with a chat template."""
    return bool((getattr(task, "taskvec_prompt_settings", None) or {}).get("apply_chat_template"))


def query_turns(task, doc) -> tuple[Turns, ...]:
    """The turns lm-eval appends for ``doc``'s query (its user turn, and gen_prefix's assistant turn), as
    ``fewshot_context`` builds them; a multiple-input task (e.g. Winogrande) has one per choice."""
    gen_prefix = task.doc_to_prefix(doc)
    if task.multiple_input:
        texts, delimiter = task.doc_to_choice(doc), ""
    else:
        texts, delimiter = [task.doc_to_text(doc)], task.config.target_delimiter
    turns = [task.build_qa_turn(q=q, gen_prefix=gen_prefix, tgt_delim=delimiter, few_delim="") for q in texts]
    return tuple(tuple((m.role, m.content) for m in messages) for messages in turns)


def as_text(turns: Turns) -> str:
    """A query's turns as one string: the pool of dummy queries holds strings."""
    return json.dumps(turns)


def from_text(text: str) -> Turns:
    return tuple((role, content) for role, content in json.loads(text))


def answer(task, doc) -> str:
    """What a generation must produce after ``doc``'s chat query: its demonstration's assistant text, less the
    ``gen_prefix`` the query's assistant turn already holds."""
    gen_prefix = task.doc_to_prefix(doc)
    turns = task.build_qa_turn(
        q=task.doc_to_text(doc),
        c=task.doc_to_choice(doc) if task.config.doc_to_choice else None,
        a=task.doc_to_target(doc),
        gen_prefix=gen_prefix,
        tgt_delim=task.config.target_delimiter,
        few_delim="",
    )
    text = turns[-1].content
    return text[len(gen_prefix) :] if gen_prefix and text.startswith(gen_prefix) else text


def render(chat_template: Callable[..., str], turns: Turns) -> str:
    """``turns`` as lm-eval renders them: with the generation prompt after a user turn, continuing the
    assistant turn (``gen_prefix``) otherwise."""
    return chat_template(
        [{"role": role, "content": content} for role, content in turns],
        add_generation_prompt=turns[-1][0] != "assistant",
    )


@dataclass(frozen=True)
class ChatSplit(Split):
    """A chat context's S and x: ``demos`` names S's turns (θ's key), ``query`` is x's one-turn chat, rendered."""

    head: Turns = ()  # the turns before the query's user turn: the system turn, the demonstrations
    prefix: str = ""  # single-turn: the demonstrations' text the query's user turn starts with; "" multi-turn
    query_turns: Turns = ()  # the query's user turn (its own text) and gen_prefix's assistant turn

    def with_query(self, turns: Turns) -> Turns:
        """S's turns followed by a query's (a dummy x'): θ's prompt [S, x']."""
        (role, text), *rest = turns
        return (*self.head, (role, self.prefix + text), *rest)


def split_chat(
    context: str,
    own: tuple[Turns, ...],
    num_fewshot: int,
    task_name: str,
    chat_template: Callable[..., str],
    need_demos: bool = True,
) -> ChatSplit:
    """Split the turns ``context`` was rendered from before the query's user turn; the query-only prompt is
    the query's turns rendered alone by ``chat_template`` (the model's). Refuse a context without
    demonstrations unless ``need_demos`` is false (a stored θ stands in for them)."""
    turns = _RENDERED.get(context)
    if turns is None:
        raise ValueError(
            f"task {task_name!r} was rendered with a chat template, but not by this model in this process (lm-eval's "
            "request cache, --cache_requests true, reuses contexts without rendering them again), so its turns are "
            "unknown and its demonstrations cannot be told from its query: run without --cache_requests, or with "
            "--cache_requests refresh"
        )
    if not any(q[0][1] for q in own):
        raise ValueError(f"task {task_name!r} renders an empty query for this document: nothing to patch θ onto")
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    matches = []
    if users:
        last = users[-1]
        text, tail = turns[last][1], turns[last + 1 :]
        matches = [q for q in own if q[0][1] and q[1:] == tail and text.endswith(q[0][1])]
    if not matches:
        raise ValueError(
            f"the chat context of task {task_name!r} does not end with the query turn the task renders "
            f"({own[0] if own else ()!r}): its turns are {turns[-2:]!r}"
        )
    query = max(matches, key=lambda q: len(q[0][1]))
    prefix = text[: len(text) - len(query[0][1])]
    head = turns[:last]
    if need_demos and (num_fewshot < 1 or not (prefix.strip() or any(role != "system" for role, _ in head))):
        raise ValueError(
            f"task {task_name!r} runs {num_fewshot}-shot: its context has no demonstrations to compress into θ "
            f"(a description or system instruction alone is not a demonstration). {shots_fix(task_name)}"
        )
    return ChatSplit(
        demos=json.dumps([head, prefix]),
        query=render(chat_template, query),
        head=head,
        prefix=prefix,
        query_turns=query,
    )
