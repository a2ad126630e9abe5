"""Property-based: over generated task formats, every request splits exactly into S and x, or fails clearly.

Delimiters, descriptions, query templates and inputs are drawn to contain each other's delimiters, blank
lines and non-ASCII characters; the expected S and x are written out here from the format's pieces.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tasks import make_task, requests_of

DELIMITERS = ["\n", "\n\n", " ", "###", "§", "\n\n\n", " | ", "→\n"]
TARGET_DELIMITERS = ["", " ", "\n", "\n\n", ": "]
DESCRIPTIONS = ["", "Task.\n\n", "Ünïcode désc\n", "a\n\nb\n\n", "Q: x\nA: y\n\n"]
TEMPLATE_PIECES = ["", "Q: ", "\n\nQ:", "->", "¿", "\n", " A:", "\nA:", "§"]
INPUT_TEXT = st.text(alphabet="abcé→ \n§#|:", min_size=1, max_size=8)


def delimited(q: str, gen_prefix: str, tgt: str) -> str:
    """lm-eval's rule: a target delimiter goes between the question and a gen_prefix unless either side
    already has whitespace at the join."""
    return q + (tgt if not (q[-1:].isspace() or gen_prefix[:1].isspace()) and q else "") + gen_prefix


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fewshot_delimiter=st.sampled_from(DELIMITERS),
    target_delimiter=st.sampled_from(TARGET_DELIMITERS),
    description=st.sampled_from(DESCRIPTIONS),
    before=st.sampled_from(TEMPLATE_PIECES),
    after=st.sampled_from(TEMPLATE_PIECES),
    gen_prefix=st.sampled_from([None, "Answer:", " A="]),
    inputs=st.lists(INPUT_TEXT, min_size=6, max_size=6, unique=True),
    num_fewshot=st.integers(1, 3),
)
def test_generated_formats_split_exactly(
    make_lm, fewshot_delimiter, target_delimiter, description, before, after, gen_prefix, inputs, num_fewshot
):
    rows = [{"input": x, "answers": [f"<{i}>"]} for i, x in enumerate(inputs)]
    task = make_task(
        splits={"train": rows[:3], "test": rows[3:]},
        fewshot_config={"sampler": "first_n"},
        num_fewshot=num_fewshot,
        fewshot_delimiter=fewshot_delimiter,
        target_delimiter=target_delimiter,
        description=description,
        doc_to_text=f"{before}{{{{input}}}}{after}",
        gen_prefix=gen_prefix,
    )
    lm = make_lm(mode="baseline")
    for request in requests_of(task):
        question = f"{before}{request.doc['input']}{after}"
        if gen_prefix:
            query = delimited(question, gen_prefix, target_delimiter)
            demos = "".join(
                delimited(f"{before}{r['input']}{after}", gen_prefix, target_delimiter)
                + (" " if not gen_prefix[-1].isspace() else "")
                + r["answers"][0]
                + fewshot_delimiter
                for r in rows[:num_fewshot]
            )
        else:
            query = question
            demos = "".join(
                f"{before}{r['input']}{after}{target_delimiter}{r['answers'][0]}{fewshot_delimiter}"
                for r in rows[:num_fewshot]
            )
        assert request.args[0] == description + demos + query  # the format is what we think it is
        split, own = lm.planner.split(request)
        assert (split.demos, split.query) == (description + demos, query)
        assert own == (query,)


@pytest.mark.parametrize("context", ["", "example:a->"])
def test_a_context_that_does_not_end_with_the_query_fails_clearly(make_lm, context):
    task = make_task()
    request = requests_of(task, limit=1)[0]
    request.arguments = (context, request.args[1])
    with pytest.raises(ValueError, match="does not end with the query the task renders"):
        make_lm(mode="baseline").planner.split(request)
