"""What ``layer=auto`` scores each block by, per task.

- ``choice_accuracy`` (multiple choice): the choice with the highest log-likelihood is the right one, as lm-eval
  scores ``acc``;
- ``first_token`` (generation with short answers, the paper's protocol): the first generated token is the
  reference's first token;
- ``reference_loglikelihood`` (generation with answers longer than a few words, chain-of-thought and MATH-style
  configs whose demonstrations answer at length): the mean log-likelihood per token of the reference's first
  ``REFERENCE_TOKENS`` tokens after the (patched) query. The first token of "Natalia sold 48 clips..." says
  nothing about the answer, and a model that reasons before it answers never starts with the reference at all.

The answers' length is read in words (tokenizer-independent, so a task's criterion is the same for every
model), both of the dev references and of the demonstrations' answers: chain-of-thought configs answer a
demonstration at length but keep only the final answer as a document's reference.
"""

from __future__ import annotations

import statistics
from itertools import islice

from lm_eval_taskvec._autoload import LOADED_TASKS

CHOICE_ACCURACY = "choice_accuracy"
FIRST_TOKEN = "first_token"
REFERENCE_LOGLIKELIHOOD = "reference_loglikelihood"
DEFAULTS = (CHOICE_ACCURACY, FIRST_TOKEN)  # the criteria of every choice made before the criterion was recorded
SHORT_ANSWER_WORDS = 3  # a median answer of at most this many words is scored by its first token
REFERENCE_TOKENS = 32  # reference_loglikelihood scores at most this many tokens of each reference
DEMOS_READ = 16  # few-shot documents whose answers are counted


def criterion_for(task_name: str, references: list) -> str:
    """The criterion of a task whose dev documents are right with ``references`` (choice indices or texts)."""
    if not references or not all(isinstance(r, str) for r in references):
        return CHOICE_ACCURACY
    lengths = [_words(r) for r in references]
    task = LOADED_TASKS.get(task_name)
    demos = _demo_answers(task) if task is not None else []
    long = statistics.median(lengths) > SHORT_ANSWER_WORDS
    if demos and statistics.median(map(_words, demos)) > SHORT_ANSWER_WORDS:
        long = True
    return REFERENCE_LOGLIKELIHOOD if long else FIRST_TOKEN


def why(criterion: str) -> str:
    """Why a task is scored by ``criterion``, for the log."""
    return {
        CHOICE_ACCURACY: "the choice with the highest log-likelihood, as lm-eval's acc",
        FIRST_TOKEN: f"answers of at most {SHORT_ANSWER_WORDS} words: the first generated token",
        REFERENCE_LOGLIKELIHOOD: (
            f"answers longer than {SHORT_ANSWER_WORDS} words (in the references or the demonstrations): the mean "
            f"log-likelihood per token of the reference's first {REFERENCE_TOKENS} tokens"
        ),
    }[criterion]


def _words(text: str) -> int:
    return len(text.split())


def _demo_answers(task) -> list[str]:
    """The answers the first few-shot documents show as demonstrations (their few-shot target)."""
    if not hasattr(task, "fewshot_docs") or not hasattr(task, "fewshot_cfg"):
        return []
    try:
        docs = list(islice(task.fewshot_docs() or [], DEMOS_READ))
    except Exception:  # noqa: BLE001 - a task without a few-shot pool (its demonstrations are elsewhere)
        return []
    answers = []
    for doc in docs:
        target = task.doc_to_target(doc, task.fewshot_cfg.doc_to_target)
        if isinstance(target, list):
            target = target[0] if target else ""
        if isinstance(target, str):
            answers.append(target)
    return answers
