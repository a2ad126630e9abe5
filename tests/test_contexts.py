"""S and x come from lm-eval's own task object: each prompt shape's split, written out literally."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_taskvec.contexts import choose_dummies, split_at_delimiter, split_for_task
from lm_eval_taskvec.settings import read_escapes
from tests.helpers import gen_requests
from tests.tasks import make_task, requests_of

FIRST_TWO = {"sampler": "first_n"}  # demonstrations: the first two train rows, a and b
MC = {"output_type": "multiple_choice", "doc_to_choice": "{{[answers[0], 'zz']}}", "doc_to_target": 0}


def split_first(lm, build=None, **config):
    task = make_task(fewshot_config=FIRST_TWO, num_fewshot=2, **config)
    request = requests_of(task, limit=1, **(build or {}))[0]
    return lm.planner.split(request)[0]


@pytest.mark.parametrize(
    "config, build, demos, query",
    [
        ({"description": "Make it big.\n\n"}, None, "Make it big.\n\nexample:a->A\nexample:b->B\n", "example:fc->"),
        ({}, {"system_instruction": "Be brief."}, "Be brief.example:a->A\nexample:b->B\n", "example:fc->"),
        (
            {"description": "Make it big."},
            {"system_instruction": "Be brief."},
            "Be brief.\nMake it big.example:a->A\nexample:b->B\n",
            "example:fc->",
        ),
        (
            {"doc_to_text": "Q: {{input}}\nA:", "fewshot_delimiter": "\n\n", "target_delimiter": " "},
            None,
            "Q: a\nA: A\n\nQ: b\nA: B\n\n",
            "Q: fc\nA:",
        ),
        (
            {"gen_prefix": "Answer:", "target_delimiter": " "},
            None,
            "example:a-> Answer: A\nexample:b-> Answer: B\n",
            "example:fc-> Answer:",
        ),
        (
            {"doc_to_text": "Q: {{input}}", "fewshot_delimiter": "\n\n", "target_delimiter": "\n\n", **MC},
            None,
            "Q: a\n\nA\n\nQ: b\n\nB\n\n",
            "Q: fc",
        ),
        ({"doc_to_text": "Q: {{input}} A: ", **MC}, None, "Q: a A: A\nQ: b A: B\n", "Q: fc A: "),
    ],
    ids=[
        "description",
        "system-instruction",
        "both",
        "multi-line-query",
        "gen-prefix",
        "target-delimiter-blank-line",
        "query-ending-in-a-space",
    ],
)
def test_split_of_each_prompt_shape(make_lm, config, build, demos, query):
    split = split_first(make_lm(mode="baseline"), build, **config)
    assert (split.demos, split.query) == (demos, query)


def test_zero_shot_with_a_description_is_refused(make_lm):
    task = make_task(num_fewshot=0, description="Make it big.\n\n")
    with pytest.raises(ValueError, match="0-shot.*no demonstrations.*--num_fewshot"):
        make_lm(mode="baseline").planner.split(requests_of(task, limit=1)[0])


def test_empty_query_is_refused(make_lm):
    rows = [{"input": "", "answers": ["x"]}] + [{"input": c, "answers": [c]} for c in "abcd"]
    task = make_task(splits={"train": rows[1:], "test": rows}, doc_to_text="{{input}}")
    with pytest.raises(ValueError, match="empty query"):
        make_lm(mode="hypothesis", layer=1).generate_until(requests_of(task, limit=2))


def test_unknown_task_needs_the_fewshot_delimiter_arg(make_lm):
    lm = make_lm(mode="baseline", fewshot_delimiter=None)
    with pytest.raises(ValueError, match="not loaded by lm-eval.*fewshot_delimiter="):
        lm.generate_until(gen_requests("never_loaded"))
    with_docs = [
        Instance(r.request_type, {"input": "k"}, r.args, r.idx, r.metadata) for r in gen_requests("never_loaded")
    ]
    plans = make_lm(mode="baseline", fewshot_delimiter="\\n").plan(with_docs)  # a document, but no loaded task
    assert [p.query for p in plans] == [r.args[0].rpartition("\n")[2] for r in with_docs]


def test_of_several_rendered_queries_the_longest_the_context_ends_with_is_the_query():
    # a multiple-input task renders one query per choice; one may be a suffix of another
    split = split_for_task("Q: a\n\nthe cat sat", ("sat", "the cat sat", "dog"), 1, "t")
    assert (split.demos, split.query) == ("Q: a\n\n", "the cat sat")


def test_a_delimiter_after_whitespace_only_is_no_demonstration():
    with pytest.raises(ValueError, match="context has no demonstrations"):
        split_at_delimiter("  \nexample:b->", "\n")
    with pytest.raises(ValueError, match="context has no demonstrations"):
        split_at_delimiter("example:b->", "\n")


def test_delimiters_keep_non_ascii_and_read_escapes():
    assert read_escapes("\\n") == "\n" and read_escapes("§\\n→") == "§\n→"
    split = split_at_delimiter("a->A§b->B§c->", read_escapes("§"))
    assert (split.demos, split.query) == ("a->A§b->B§", "c->")


def test_dummies_never_include_the_documents_own_query(make_lm):
    lm = make_lm(mode="hypothesis", layer=1)
    task = make_task(num_fewshot=1, fewshot_config=FIRST_TWO)  # every document shares S: one dummy order for all
    requests = requests_of(task)
    for request, plan in zip(requests, lm.planner.plan(requests)):
        own = f"example:{request.doc['input']}->"
        assert plan.query == own and own not in plan.theta_key.dummies and len(plan.theta_key.dummies) == 2
    assert choose_dummies(["x", "y", "z"], ("x",), 2, 0, "t", "S") in {("y", "z"), ("z", "y")}


def test_dummies_do_not_depend_on_limit(make_lm):
    lm = make_lm(mode="hypothesis", layer=1)
    task = make_task()
    first = lm.planner.plan(requests_of(task, limit=1))[0]
    assert lm.planner.plan(requests_of(task)[:1])[0] == first


@pytest.mark.parametrize("description", [None, "Make it big. " * 60], ids=["short", "over-long demonstrations"])
def test_theta_is_read_and_patched_at_the_same_token_when_the_query_ends_in_a_space(make_lm, description):
    lm = make_lm(mode="hypothesis", layer=1)
    task = make_task(doc_to_text="Q: {{input}} A: ", description=description, **MC)
    request = requests_of(task, limit=1)[0]
    plan = lm.planner.plan([request])[0]
    assert (plan.theta_key.max_tokens is None) == (description is None)  # θ's prompts left-truncated, still stripped
    read_at = [prompt[-1] for prompt in lm.thetas.prompts(plan.theta_key)]
    patched_at = lm.encode_pair(plan.query, request.args[1])[0][-1]
    assert lm.tok_decode([patched_at]).endswith(":") and read_at == [patched_at, patched_at]


def test_generation_reads_theta_at_the_querys_own_last_token_trailing_space_included(make_lm):
    lm = make_lm(mode="hypothesis", layer=1)
    request = requests_of(make_task(doc_to_text="Q: {{input}} A: "), limit=1)[0]  # generate_until keeps the space
    plan = lm.planner.plan([request])[0]
    patched_at = lm.tok_encode(plan.query)[-1]  # generate_until patches the prompt's last column
    assert lm.tok_decode([patched_at]).endswith(" ")
    assert [prompt[-1] for prompt in lm.thetas.prompts(plan.theta_key)] == [patched_at, patched_at]


def test_over_long_demonstrations_are_left_truncated_like_regular_mode(make_lm, caplog):
    lm = make_lm(mode="hypothesis", layer=1)
    task = make_task(description="Make it big. " * 60)  # about 300 tokens; the tiny models hold 256
    request = requests_of(task, limit=1)[0]
    plan = lm.plan([request])[0]
    budget = lm.max_length - 4  # max_gen_toks of the task
    assert plan.theta_key.max_tokens == budget and "left-truncated" in caplog.text
    full = [lm.tok_encode(plan.theta_key.demos + d) for d in plan.theta_key.dummies]
    assert all(len(f) > budget for f in full)
    states = [lm.model(torch.tensor([f[-budget:]]), output_hidden_states=True).hidden_states[2][0, -1] for f in full]
    torch.testing.assert_close(
        lm.thetas.get(plan.layer, plan.theta_key), torch.stack(states).mean(0), rtol=1e-4, atol=1e-4
    )


def test_a_query_longer_than_the_model_is_refused_never_cut(make_lm):
    rows = [{"input": "ab" * 300, "answers": ["x"]}] + [{"input": c, "answers": [c]} for c in "abcd"]
    task = make_task(splits={"train": rows[1:], "test": rows})
    with pytest.raises(ValueError, match="query alone is .* tokens.*never cuts the query"):
        make_lm(mode="baseline").generate_until(requests_of(task, limit=1))


@pytest.mark.parametrize("over", [1, 8], ids=["one token over", "far over"])
def test_a_likelihood_query_that_fits_only_without_its_continuation_is_refused(make_lm, over):
    rows = [{"input": "ab" * 12, "answers": ["x" * 12]}] + [{"input": c, "answers": [c]} for c in "abcd"]
    task = make_task(
        splits={"train": rows[1:], "test": rows},
        doc_to_choice="{{[answers[0], 'zz']}}",
        doc_to_target=0,
        output_type="multiple_choice",
    )
    requests = requests_of(task, limit=1)
    query, continuation = make_lm(mode="baseline")._encode_pair(
        requests[0].args[0].rpartition("\n")[2], requests[0].args[1]
    )
    max_length = len(query) + len(continuation) - 1 - over  # HFLM keeps max_length + 1 tokens of the row
    assert len(query) <= max_length
    with pytest.raises(ValueError, match="query alone is .* tokens.*never cuts the query"):
        make_lm(mode="baseline", max_length=max_length).loglikelihood(requests)


@pytest.mark.parametrize("mode", ["baseline", "hypothesis"])
def test_a_whitespace_query_is_refused_for_likelihood_but_generated_from(make_lm, mode):
    lm = make_lm(mode=mode, layer=1, num_dummy=1)
    context = "example:a->A\nexample:b->B\n "  # split at the last "\n": the query is one space
    requests = [
        Instance("loglikelihood", {}, (context, "C"), 0, ("t", 0, 1)),
        Instance("loglikelihood", {}, ("example:a->A\nexample:c->", "C"), 1, ("t", 1, 1)),
    ]
    with pytest.raises(ValueError, match="query ' ' is only whitespace"):
        lm.loglikelihood(requests)
    generated = [
        Instance("generate_until", {}, (r.args[0], {"until": ["\n"], "max_gen_toks": 2}), r.idx, r.metadata)
        for r in requests
    ]
    assert len(lm.generate_until(generated)) == 2  # a generation continues from the space itself


def test_plans_do_not_depend_on_the_rank(make_lm):
    """With 2 processes each rank plans only its own requests; each request's dummies and θ (and the layer,
    see test_selection) are what one process planning every request gives. (Which demonstrations a request
    gets is lm-eval's business: its sampler draws per rank.)"""
    task = make_task()
    by_rank = []
    for rank in (0, 1):
        task.set_fewshot_seed(1234)
        task.build_all_requests(rank=rank, world_size=2)
        by_rank.append(list(task.instances))
    everything = make_lm(mode="hypothesis", layer=1)
    together = everything.plan(by_rank[0] + by_rank[1])
    alone = []
    for requests in by_rank:
        lm = make_lm(mode="hypothesis", layer=1)
        alone += [(plan, lm.thetas.get(plan.layer, plan.theta_key)) for plan in lm.plan(requests)]
    assert [plan for plan, _ in alone] == together and len(together) == 24
    for (_, theta), other in zip(alone, together):
        torch.testing.assert_close(theta, everything.thetas.get(other.layer, other.theta_key))
