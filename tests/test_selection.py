"""layer=auto: swept on documents that are never scored, cached safely, reported in the results."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_taskvec import identity, selection
from lm_eval_taskvec.extraction import Prefix, branch_mask_kind
from lm_eval_taskvec.planning import Plan
from lm_eval_taskvec.selection import cache, sweep
from lm_eval_taskvec.selection.dev import DevExample, dev_sets, fold_members
from lm_eval_taskvec.tasks import task_dir
from lm_eval_taskvec.theta import ThetaKey, ThetaStore
from tests.helpers import ARCHITECTURES, make_model, run_task
from tests.tasks import letter_rows, make_task, requests_of


def key_of(lm, task_name: str, sets) -> str:
    return cache.cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, task_name, sets)


@pytest.fixture
def layer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "fresh"))  # not there yet, as on a new machine
    return tmp_path / "fresh" / "layers"


def queries(examples) -> list[str]:
    return [ex.requests[0].args[0].rpartition("\n")[2] for ex in examples]


def test_auto_sweeps_every_block_on_validation_and_reports_the_curve(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", num_dev=6)
    chosen = run_task(lm)["config"]["taskvec"]["layer_selection"]["tv_list_first"]
    curve = chosen["dev_accuracy"]
    assert len(curve) == len(lm.blocks) and chosen["source"] == "sweep" and chosen["num_dev"] == 6
    assert chosen["dev_split"] == "validation" and len(chosen["dev_docs"]) == 6
    assert chosen["layer"] == max(range(len(curve)), key=lambda i: (curve[i], -i))  # ties -> lowest
    assert {"baseline_accuracy", "regular_accuracy", "no_effect", "p_value"} <= chosen.keys()
    assert len(list(layer_cache.glob("*.json"))) == 1


def test_validation_dev_documents_are_validation_rows(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", num_dev=10)
    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)  # loads the task object
    data = [json.loads(line) for line in (task_dir() / "data" / "tv_list_first.jsonl").read_text().splitlines()]
    split_of = {f"example:{row['input']}->": row["split"] for row in data}
    (dev,) = dev_sets(lm.settings, "tv_list_first")
    assert dev.split == "validation" and dev.scored is None
    assert len(dev.examples) == 10 and {split_of[q] for q in queries(dev.examples)} == {"validation"}


def test_leave_one_out_over_the_fewshot_pool_when_there_is_no_validation_split(make_lm, layer_cache):
    task = make_task(splits={"train": letter_rows(30), "test": letter_rows(20, 30)}, num_fewshot=4)
    requests_of(task, limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=30)
    (dev,) = dev_sets(lm.settings, "tiny")
    assert dev.split == "train (leave-one-out)" and len({ex.doc_id for ex in dev.examples}) == 30
    train = {f"example:{row['input']}->" for row in letter_rows(30)}
    for ex in dev.examples:
        context, own = ex.requests[0].args[0], ex.requests[0].doc
        assert queries([ex])[0] in train
        assert f"example:{own['input']}->{own['answers'][0]}\n" not in context  # never its own demonstration


@pytest.mark.parametrize("splits", ["test only", "every split the same"])
def test_tasks_without_disjoint_dev_documents_are_cross_fitted(make_lm, layer_cache, splits):
    rows = letter_rows(26)
    layout = {"test": rows} if splits == "test only" else {"train": rows, "validation": rows, "test": rows}
    task = make_task(splits=layout, fewshot_split="test", num_fewshot=3)
    requests_of(task, limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=20)
    halves = dev_sets(lm.settings, "tiny")
    assert [dev.split for dev in halves] == ["test (cross-fit: scored on the other half)"] * 2
    assert halves[0].scored | halves[1].scored == set(range(26)) and not halves[0].scored & halves[1].scored
    for dev in halves:
        dev_docs = {ex.doc_id for ex in dev.examples}
        assert dev_docs and not dev_docs & dev.scored  # tuned on the other half only
        for ex in dev.examples:
            own = ex.requests[0].doc
            assert f"example:{own['input']}->{own['answers'][0]}\n" not in ex.requests[0].args[0]


@pytest.mark.parametrize(
    "rows, source",
    [
        ({"train": letter_rows(24), "validation": letter_rows(10, 24), "test": letter_rows(24, 48)}, "validation"),
        (
            {"train": letter_rows(24), "validation": letter_rows(9, 24), "test": letter_rows(24, 48)},
            "train (leave-one-out)",
        ),
        ({"train": letter_rows(13), "test": letter_rows(20, 30)}, "train (leave-one-out)"),  # 10 + 3 demonstrations
        ({"train": letter_rows(12), "test": letter_rows(10, 30)}, "test (cross-fit: scored on the other half)"),
        ({"train": letter_rows(12), "test": letter_rows(9, 30)}, None),  # halves of 4 and 5: too few
    ],
    ids=["10 validation docs", "9 validation docs", "13 train docs", "12 train docs, 10 test docs", "9 test docs"],
)
def test_each_dev_source_is_used_from_exactly_its_minimum_size(make_lm, rows, source):
    task = make_task(splits=rows, num_fewshot=3)
    requests_of(task, limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=4)
    if source is None:
        with pytest.raises(ValueError, match="too few to cross-fit"):
            dev_sets(lm.settings, "tiny")
    else:
        assert {dev.split for dev in dev_sets(lm.settings, "tiny")} == {source}


@pytest.mark.parametrize("shots", [0, 1])
def test_auto_needs_at_least_one_demonstration(make_lm, shots):
    requests_of(make_task(num_fewshot=shots), limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=4)
    if shots:
        assert [len(dev.examples) for dev in dev_sets(lm.settings, "tiny")] == [4]
    else:
        with pytest.raises(ValueError, match="layer=auto needs demonstrations.*--num_fewshot"):
            dev_sets(lm.settings, "tiny")


def test_cross_fitted_halves_are_scored_at_the_other_halfs_layer(make_lm, layer_cache, monkeypatch):
    task = make_task(splits={"test": letter_rows(26)}, fewshot_split="test", num_fewshot=3)
    requests = requests_of(task)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=12, layer_cache="off")
    halves = dev_sets(lm.settings, "tiny")
    fake = iter([[0, 1, 0], [2, 0, 0]])  # block-wise hits: half 0's dev set picks block 1, half 1's picks block 0
    monkeypatch.setattr(
        sweep,
        "score",
        lambda lm, name, sets: [
            (
                torch.tensor([next(fake)] * 4).T.bool(),
                torch.zeros(4, dtype=torch.bool),
                torch.zeros(4, dtype=torch.bool),
            )
            for _ in sets
        ],
    )
    choice = selection.select_layer(lm, "tiny")
    assert [fold["layer"] for fold in choice["folds"]] == [1, 0] and choice["task"] == "tiny"
    for fold, other in zip(choice["folds"], halves[::-1]):  # each half's layer was chosen on the other half
        assert fold["dev_docs"] and set(fold["dev_docs"]) <= other.scored
    for request, plan in zip(requests, lm.plan(requests)):
        assert plan.layer == (1 if request.doc_id in halves[0].scored else 0)


def test_cross_fitted_halves_scored_together_equal_each_half_scored_alone(make_lm, layer_cache, monkeypatch):
    """The halves share most of their demonstrations, so they run in one sweep: each half's scores are its own."""
    task = make_task(
        splits={"test": letter_rows(26)},
        fewshot_split="test",
        num_fewshot=3,
        doc_to_text="Q: {{input}}\nA:",
        target_delimiter=" ",
        output_type="multiple_choice",
        doc_to_choice="{{[answers[0], input, 'zz']}}",
        doc_to_target=0,
    )
    requests_of(task, limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=8, layer_cache="off")
    halves = dev_sets(lm.settings, "tiny")
    plans = [lm.planner.plan(ex.requests)[0] for dev in halves for ex in dev.examples]
    assert len({p.theta_key for p in plans}) < len(plans)  # shared S, shared θ
    scored = {}
    for name in ("fork_scores", "regular_and_thetas"):
        monkeypatch.setattr(
            sweep,
            name,
            lambda *a, _f=getattr(sweep, name), _n=name: scored.setdefault(_n, []).append(_f(*a)) or scored[_n][-1],  # noqa: B008
        )
    together = sweep.score(lm, "tiny", halves)
    for half, result in zip(halves, together):
        lm.thetas.clear()
        assert [hits.tolist() for hits in result] == [hits.tolist() for hits in sweep.score(lm, "tiny", [half])[0]]
    for name, (both, *alone) in scored.items():
        assert torch.allclose(both, torch.cat(alone, -2), atol=1e-5), name


def test_choice_is_not_reused_across_runs_with_other_shots(make_lm, layer_cache, monkeypatch):
    lm = make_lm("llama", mode="hypothesis", num_dev=6, layer_cache="off")
    sweeps, choose = [], sweep.choose
    monkeypatch.setattr(sweep, "choose", lambda *a: sweeps.append(a[1]) or choose(*a))
    first = run_task(lm, num_fewshot=2)["config"]["taskvec"]["layer_selection"]["tv_list_first"]
    second = run_task(lm, num_fewshot=3)["config"]["taskvec"]["layer_selection"]["tv_list_first"]
    run_task(lm, num_fewshot=3)  # the same shots again: remembered
    assert first["source"] == second["source"] == "sweep" and sweeps == ["tv_list_first"] * 2
    assert not layer_cache.exists()  # layer_cache=off writes nothing


def test_single_token_queries(make_lm, layer_cache):
    task = make_task(doc_to_text="{{input}}", target_delimiter="=", num_fewshot=2)
    requests_of(task, limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=8)
    assert len(lm.tok_encode("b")) == 1
    assert selection.select_layer(lm, "tiny")["num_dev"] == 8


def fixed_layer_hits(make_lm, arch, mode, requests, layer=None):
    lm = make_lm(arch, mode=mode, layer=0 if layer is None else layer)
    if requests[0].request_type == "generate_until":
        one = [
            Instance("generate_until", r.doc, (r.args[0], {**r.args[1], "max_gen_toks": 1}), r.idx, r.metadata)
            for r in requests
        ]
        return [lm.tok_encode(g, add_special_tokens=False)[:1] for g in lm.generate_until(one)]
    return [lp for lp, _ in lm.loglikelihood(requests)]


def test_sweep_equals_fixed_layer_baseline_and_regular_runs_for_generation(make_lm, layer_cache):
    """Each block's dev accuracy, and baseline's and regular's, equal what the evaluation paths generate."""
    run_task(make_lm("gpt2", mode="hypothesis", layer=1), limit=1)  # loads tv_list_first
    lm = make_lm("gpt2", mode="hypothesis", num_dev=8)
    (dev,) = dev_sets(lm.settings, "tv_list_first")
    ((per_block, baseline, regular),) = sweep.score(lm, "tv_list_first", [dev])
    requests = [ex.requests[0] for ex in dev.examples]
    targets = [lm.tok_encode(ex.gold, add_special_tokens=False)[:1] for ex in dev.examples]
    for layer in range(len(lm.blocks)):
        firsts = fixed_layer_hits(make_lm, "gpt2", "hypothesis", requests, layer)
        assert per_block[layer].tolist() == [f == t for f, t in zip(firsts, targets)]
    for mode, hits in (("baseline", baseline), ("regular", regular)):
        assert hits.tolist() == [f == t for f, t in zip(fixed_layer_hits(make_lm, "gpt2", mode, requests), targets)]


def test_sweep_equals_fixed_layer_baseline_and_regular_runs_for_multiple_choice(make_lm, layer_cache, monkeypatch):
    task = make_task(
        doc_to_text="Q: {{input}}\nA:",
        target_delimiter=" ",
        fewshot_delimiter="\n\n",
        output_type="multiple_choice",
        doc_to_choice="{{[answers[0], input, 'zz']}}",
        doc_to_target=0,
    )
    requests_of(task, limit=1)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=6)
    (dev,) = dev_sets(lm.settings, "tiny")
    assert all(len(ex.requests) == 3 and ex.gold == 0 for ex in dev.examples)
    scored = {}
    for name in ("fork_scores", "regular_and_thetas"):  # baseline and every block; regular
        spy = lambda *a, _f=getattr(sweep, name), _n=name: scored.setdefault(_n, _f(*a))  # noqa: B008, E731
        monkeypatch.setattr(sweep, name, spy)
    ((per_block, baseline, regular),) = sweep.score(lm, "tiny", [dev])
    requests = [r for ex in dev.examples for r in ex.requests]

    def argmax_right(scores):
        return [max(range(3), key=scores[3 * i : 3 * i + 3].__getitem__) == 0 for i in range(len(dev.examples))]

    for layer in range(len(lm.blocks)):
        fixed = fixed_layer_hits(make_lm, "gpt2", "hypothesis", requests, layer)
        assert per_block[layer].tolist() == argmax_right(fixed)
        assert scored["fork_scores"][1 + layer, :, 0].tolist() == pytest.approx(
            fixed, abs=1e-4
        )  # its own log-likelihoods
    for mode, hits, scores in (
        ("baseline", baseline, scored["fork_scores"][0]),
        ("regular", regular, scored["regular_and_thetas"]),
    ):
        fixed = fixed_layer_hits(make_lm, "gpt2", mode, requests)
        assert hits.tolist() == argmax_right(fixed) and scores[:, 0].tolist() == pytest.approx(fixed, abs=1e-4)


def test_generation_dev_rows_are_what_hflm_generates_from_and_the_answers_first_token(
    model_factory, tokenizer, layer_cache, monkeypatch, capsys
):
    """With a tokenizer that adds BOS and prompts longer than max_length: baseline's and regular's dev rows are
    the tokens stock HFLM generates from, and each row is scored on the first token of the answer text."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing

    from lm_eval_taskvec.model import TaskVectorLM

    bos = copy.deepcopy(tokenizer)
    bos.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert bos("B").input_ids[0] == 1  # BOS added by default, as Llama's tokenizer does
    requests_of(make_task(num_fewshot=3), limit=1)
    args = dict(pretrained=model_factory("gpt2"), tokenizer=bos, device="cpu", max_length=14, batch_size=4)
    lm = TaskVectorLM(mode="hypothesis", num_dev=4, **args)
    (dev,) = dev_sets(lm.settings, "tiny")
    calls, passes = {}, []
    fork_scores, regular_and_thetas, states_after = sweep.fork_scores, sweep.regular_and_thetas, sweep.states_after
    monkeypatch.setattr(
        sweep, "fork_scores", lambda lm, rows, *a: calls.setdefault("queries", rows) and fork_scores(lm, rows, *a)
    )
    monkeypatch.setattr(
        sweep,
        "regular_and_thetas",
        lambda lm, plans, rows, *a: calls.setdefault("fulls", rows) and regular_and_thetas(lm, plans, rows, *a),
    )
    monkeypatch.setattr(sweep, "states_after", lambda *a: passes.append(a[4]) or states_after(*a))
    monkeypatch.setattr(
        lm.thetas, "last_token_states", lambda *a: pytest.fail("a second extraction pass, apart from S's")
    )
    sweep.score(lm, "tiny", [dev])
    progress = capsys.readouterr().err  # the issue's "progress bar over blocks", named by task and phase
    assert "tiny: layer sweep, θ at 3 blocks" in progress and "tiny: dev accuracy by block" in progress
    queries, fulls = calls["queries"], calls["fulls"]
    assert passes == [[0, 1, 2]]  # one extraction pass gives θ at every block
    assert len(lm.tok_encode(dev.examples[0].requests[0].args[0])) > 14  # regular's prompts are cut

    def hflm_contexts(contexts):
        seen = []

        def spy(self, context, max_length, stop, **kwargs):
            seen.extend(tuple(row[mask.bool()].tolist()) for row, mask in zip(context, kwargs["attention_mask"]))
            return torch.cat([context, torch.full((len(context), 1), 5)], 1)

        one_token = {"until": ["\n"], "do_sample": False, "max_gen_toks": 1}
        with monkeypatch.context() as patch:
            patch.setattr(HFLM, "_model_generate", spy)
            HFLM(**args).generate_until(
                [Instance("generate_until", {}, (c, one_token), i) for i, c in enumerate(contexts)]
            )
        return sorted(seen)

    assert sorted(tuple(ctx) for ctx, _ in fulls) == hflm_contexts([ex.requests[0].args[0] for ex in dev.examples])
    assert sorted(tuple(ctx) for ctx, _ in queries) == hflm_contexts(
        [p.query for p in lm.planner.plan([ex.requests[0] for ex in dev.examples])]
    )
    answers = [bos.convert_tokens_to_ids(bos.tokenize(ex.gold))[:1] for ex in dev.examples]
    assert [cont for _, cont in fulls] == [cont for _, cont in queries] == answers and 1 not in sum(answers, [])


@pytest.mark.parametrize("target", ["{{answers[0]}}", "{{1 if input|length == 1 else 0}}"], ids=["text", "index"])
def test_multiple_choice_gold_is_each_dev_documents_own_answer(make_lm, layer_cache, target):
    choices = "{{[input, answers[0]] if input|length == 1 else [answers[0], input]}}"  # the answer moves
    task = make_task(
        doc_to_text="Q: {{input}}\nA:",
        target_delimiter=" ",
        output_type="multiple_choice",
        doc_to_choice=choices,
        doc_to_target=target,
    )
    requests_of(task, limit=1)
    (dev,) = dev_sets(make_lm("gpt2", mode="hypothesis", num_dev=24).settings, "tiny")
    golds = {ex.requests[0].doc["input"]: ex.gold for ex in dev.examples}
    assert golds == {doc["input"]: 1 if len(doc["input"]) == 1 else 0 for doc in letter_rows(24, 24)}
    assert set(golds.values()) == {0, 1}


def test_hits_read_each_dev_prompts_own_rows():
    examples = [DevExample(i, [None] * k, gold) for i, (k, gold) in enumerate([(3, 0), (2, 1), (3, 2)])]
    scores = torch.zeros(2, 8, 2)  # two blocks; rows 0-2, 3-4 and 5-7 are the three prompts' choices
    scores[0, :, 0] = torch.tensor([-1, -2, -3, -1, -2, -3, -2, -1])  # block 0: choices 0, 0 and 2 win
    scores[1, :, 0] = torch.tensor([-3, -2, -1, -2, -1, -1, -2, -3])  # block 1: choices 2, 1 and 0 win
    assert sweep._hits(examples, scores, generation=False).tolist() == [[True, False, True], [False, True, False]]
    scores[..., 1] = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]])  # first token right or not
    assert sweep._hits(examples, scores, generation=True).tolist() == [
        [True, False, True, False, False, False, False, True],
        [False] * 8,
    ]


STACK_TOKENS = sweep.STACK_TOKENS  # the default, as the tests below change it


# The sweep's cost, as bounds (exact counts depend on how rows fall into chunks: benchmarks/bench_sweep_mc.py
# prints them for a real task). Per chunk, block 0 runs once, in the plain pass: patches replay it, but for the
# one replay check of the sweep. The contexts run once into a KV cache, ROW_CHUNK at a time. Per chunk, at most
# one pass per patch (STACK_TOKENS 1: exactly that), or, as these chunks are far below the default
# STACK_TOKENS, the plain pass and one for all its patches together; the replay check adds two passes.
@pytest.mark.parametrize(
    "arch,row_chunk,stack_tokens",
    [(arch, 64, STACK_TOKENS) for arch in ARCHITECTURES]
    + [("llama", 2, STACK_TOKENS), ("llama", 64, 1), ("llama", 64, 20)],
)
def test_fork_scores_equal_a_plain_forward_pass_per_row(make_lm, monkeypatch, arch, row_chunk, stack_tokens):
    """Rows of several contexts and chunks, plain and patched at every block and at mixed blocks, patches
    stacked in one pass or not: each score must land on its own row, and equal a full forward pass patched by
    the oracle's own hook."""
    monkeypatch.setattr(sweep, "ROW_CHUNK", row_chunk)
    monkeypatch.setattr(sweep, "STACK_TOKENS", stack_tokens)
    lm = make_lm(arch)
    rows = [
        ([5, 6, 7, 8], [9]),
        ([5, 6], [10, 11, 12, 13]),
        ([20, 21, 22], [23, 24]),
        ([5, 6], [14]),
        ([30] * 7, [31, 32, 33]),
        ([40], [41, 42]),
    ]

    def first_choice(ctx):  # the model's own next token, so that some first-token flags are 1
        with torch.no_grad():
            return lm.model(torch.tensor([ctx])).logits[0, -1].argmax().item()

    rows = [
        (ctx, [first_choice(ctx)] + cont[1:]) if i in (0, 1, 3) else (ctx, cont) for i, (ctx, cont) in enumerate(rows)
    ]
    depth, hidden = len(lm.blocks), lm.model.config.hidden_size

    def plans_at(layers):  # a different θ per row and block, so a θ patched into the wrong row or block shows
        plans = [
            Plan(query="", theta_key=ThetaKey(demos=str(i), dummies=(), strip=False), layer=layer)
            for i, layer in enumerate(layers)
        ]
        for i, plan in enumerate(plans):
            seed = torch.Generator().manual_seed(100 * plan.layer + i)
            lm.thetas.put(plan.layer, plan.theta_key, torch.randn(hidden, generator=seed))
        return plans

    patches = [None] + [plans_at([layer] * len(rows)) for layer in range(depth)]
    patches.append(plans_at([depth - 1 - i % depth for i in range(len(rows))]))  # each row at its own block
    part_of_block_0 = next(m for m in lm.blocks[0].modules() if list(m.parameters(recurse=False)))
    runs_of_block_0, model_passes, per_chunk = [], [], []  # per chunk: (runs of block 0, passes) it took
    score_chunk = sweep._score_chunk

    def counted(*args):
        before = len(runs_of_block_0), len(model_passes)
        score_chunk(*args)
        per_chunk.append((len(runs_of_block_0) - before[0], len(model_passes) - before[1]))

    monkeypatch.setattr(sweep, "_score_chunk", counted)
    branch_mask_kind(lm.model)  # the model's one-off check of branch masks runs before counting
    handle = part_of_block_0.register_forward_pre_hook(lambda *_: runs_of_block_0.append(1))
    counter = lm.model.register_forward_pre_hook(lambda *_: model_passes.append(1))
    try:
        scores = sweep.fork_scores(lm, rows, patches)
    finally:
        handle.remove()
        counter.remove()
    assert scores[0, [0, 1, 3], 1].tolist() == [1.0, 1.0, 1.0]
    chunks, contexts = len(per_chunk), len({tuple(ctx) for ctx, _ in rows})
    runs_in_chunks, passes_in_chunks = (sum(counts) for counts in zip(*per_chunk))
    # Patches never re-run block 0: it and the blocks up to each patch replay the plain pass.
    assert runs_in_chunks <= chunks + 1 and max(runs for runs, _ in per_chunk) <= 2
    assert len(model_passes) - passes_in_chunks <= -(-contexts // row_chunk)  # each group's contexts: one prefill
    assert chunks * 2 <= passes_in_chunks <= chunks * len(patches) + 1
    if stack_tokens == STACK_TOKENS:
        assert passes_in_chunks <= chunks * 2 + 2
    if stack_tokens == 1:
        assert passes_in_chunks >= chunks * (len(patches) - 1)
    assert not lm._warned

    assert_oracle_scores(lm, rows, patches, scores)


@pytest.mark.parametrize(
    "arch,attention",
    [(arch, "sdpa") for arch in ARCHITECTURES] + [("llama", "eager"), ("gpt2", "no mask"), ("qwen2", "misread")],
)
def test_fork_scores_of_a_contexts_rows_run_as_branches_equal_a_forward_pass_per_row(
    make_lm, monkeypatch, arch, attention
):
    """Choices of one question (one context, one θ) run as branches of one sequence after its last token, under
    SDPA's and eager attention's masks; a model that takes no such mask runs one row per sequence."""
    lm = make_lm(arch)
    branch_mask_kind(lm.model)  # the model's own answer, cached on it: restored after the changes below
    if attention != "sdpa":
        monkeypatch.delattr(lm.model, "_taskvec_branch_mask")
    if attention == "eager":
        monkeypatch.setattr(lm.model.config, "_attn_implementation", "eager")
    if attention == "no mask":  # e.g. flash attention: chosen now, while the tiny model runs SDPA below
        monkeypatch.setattr(lm.model.config, "_attn_implementation", "flash_attention_2")
        assert branch_mask_kind(lm.model) is None
        monkeypatch.setattr(lm.model.config, "_attn_implementation", "sdpa")
    if attention == "misread":  # a model that reads a 4D mask its own way (here: attends everywhere)
        forward = lm.model.forward
        monkeypatch.setattr(
            lm.model,
            "forward",
            lambda *a, attention_mask=None, **k: forward(
                *a,
                attention_mask=attention_mask
                if attention_mask is None or attention_mask.dim() < 4
                else torch.ones_like(attention_mask),
                **k,
            ),
        )
    expected = {"sdpa": "bool", "eager": "additive", "no mask": None, "misread": None}[attention]
    assert sweep.branch_mask_kind(lm.model) == expected
    # Choices [9, 10, 11] and [9, 10, 14] share all their tokens but the last, [22, 23] and [22, 25] their first.
    rows = [
        ([5, 6, 7], [8]),
        ([5, 6, 7], [9, 10, 11]),
        ([5, 6, 7], [12, 13]),
        ([5, 6, 7], [9, 10, 14]),
        ([20, 21], [22, 23]),
        ([20, 21], [24]),
        ([20, 21], [22, 25]),
        ([30, 31, 32, 33], [34, 35]),
    ]
    keys = {tuple(ctx): ThetaKey(demos=str(ctx), dummies=(), strip=False) for ctx, _ in rows}
    depth, hidden = len(lm.blocks), lm.model.config.hidden_size
    for layer in range(depth):
        for c, key in enumerate(keys.values()):
            lm.thetas.put(layer, key, torch.randn(hidden, generator=torch.Generator().manual_seed(10 * layer + c)))
    patches = [None] + [[Plan("", keys[tuple(ctx)], layer) for ctx, _ in rows] for layer in range(depth)]
    monkeypatch.setattr(sweep, "STACK_TOKENS", 1)  # a pass per patch: every pass runs the chunk's sequences once
    tokens_run, extend_branches = {}, Prefix.extend_branches  # each chunk's sequences: real tokens they run

    def counting(self, model, heads, branches, kind):
        count = []
        handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda m, a: count.append(int((a[0] > 0).sum()))
        )
        try:
            return extend_branches(self, model, heads, branches, kind)
        finally:
            handle.remove()
            tokens_run[tuple((tuple(h), tuple(map(tuple, b))) for h, b in zip(heads, branches))] = count[0]

    monkeypatch.setattr(Prefix, "extend_branches", counting)
    scores = sweep.fork_scores(lm, rows, patches)
    sequences = [sequence for chunk in tokens_run for sequence in chunk]
    questions = {tuple(ctx) for ctx, _ in rows}
    assert sum(len(b) for _, b in sequences) == len(rows)  # every row runs, once
    assert len(sequences) == (len(questions) if expected else len(rows))  # a question's rows as one sequence
    # A row on its own runs its context's last token (the rest is in the KV cache), then its continuation but
    # the last token. As branches, each question's last token runs once, then its choices as a trie: each
    # distinct (question, choice prefix) once.
    one_row_each = sum(len(cont) for _, cont in rows)
    trie = len(questions) + len({(tuple(ctx), tuple(cont[:k])) for ctx, cont in rows for k in range(1, len(cont))})
    assert trie < one_row_each  # the rows do share tokens
    assert sum(tokens_run.values()) == (trie if expected else one_row_each)
    assert_oracle_scores(lm, rows, patches, scores)


def assert_oracle_scores(lm, rows, patches, scores):
    """``scores`` equal, row by row, a full forward pass patched by the oracle's own hook."""

    def replace_at(layer, position, theta):  # a plain forward hook on one row
        def hook(module, args, output):
            states = output[0] if isinstance(output, tuple) else output
            states[0, position] = theta

        return lm.blocks[layer].register_forward_hook(hook)

    for p, plans in enumerate(patches):
        for i, (ctx, cont) in enumerate(rows):
            handle = (
                replace_at(plans[i].layer, len(ctx) - 1, lm.thetas.get(plans[i].layer, plans[i].theta_key))
                if plans
                else None
            )
            try:
                with torch.no_grad():
                    logprobs = lm.model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            finally:
                if handle:
                    handle.remove()
            total = sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            assert scores[p, i, 0].item() == pytest.approx(total, abs=1e-4)
            assert scores[p, i, 1].item() == float(logprobs[len(ctx) - 1].argmax().item() == cont[0])


def test_replay_check_catches_a_block_that_reads_state_another_block_leaves(make_lm, model_factory):
    """The top block reads state that block 0's forward leaves behind (as layers sharing a KV cache would).
    Replay skips block 0's forward, so only a check at a patch that leaves the top block to run can see it:
    the check must reject replaying, warn, and every score must equal a full forward pass. The model is a copy
    of the session's: its hooks and its block's forward stay with it."""
    lm = make_lm(pretrained=copy.deepcopy(model_factory("llama")))
    ran = []
    forward_0 = lm.blocks[0].forward
    lm.blocks[0].forward = lambda *args, **kwargs: ran.append(1) or forward_0(*args, **kwargs)
    lm.model.register_forward_pre_hook(lambda *_: ran.clear())

    def leak(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + 1e-2 * len(ran), *output[1:])
        return output + 1e-2 * len(ran)

    lm.blocks[-1].register_forward_hook(leak)
    rows = [([5, 6, 7, 8], [9, 10]), ([20, 21, 22], [23, 24, 25])]
    key = ThetaKey(demos="d", dummies=(), strip=False)
    patches = [None] + [[Plan(query="", theta_key=key, layer=layer)] * len(rows) for layer in range(len(lm.blocks))]
    for layer in range(len(lm.blocks)):
        lm.thetas.put(
            layer, key, torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(layer))
        )
    scores = sweep.fork_scores(lm, rows, patches)
    assert any("runs every block for every patch" in message for message in lm._warned)
    assert_oracle_scores(lm, rows, patches, scores)


@pytest.mark.parametrize(
    "arch,row_chunk,unshared", [(arch, 64, False) for arch in ARCHITECTURES] + [("llama", 1, False), ("gpt2", 64, True)]
)
def test_regular_scores_and_theta_sharing_s_equal_separate_runs(make_lm, monkeypatch, arch, row_chunk, unshared):
    """The sweep runs S once for regular's dev scores and θ's prompts: its scores equal a plain forward pass
    of each full prompt, and its θ the evaluation's own extraction, at every block (prompts of different
    lengths, two continuations of one prompt, two queries after one S, several batches; logits of one row at a
    time; a batch where one prompt shares nothing with its θ prompts)."""
    monkeypatch.setattr(sweep, "ROW_CHUNK", row_chunk)
    lm = make_lm(arch, mode="hypothesis", layer=0, batch_size=2)
    if unshared:  # the first prompt's θ prompts start with a token its full prompt does not have
        theta_prompts = lm.thetas.prompts
        monkeypatch.setattr(
            lm.thetas, "prompts", lambda key: [[3] + p if "e->E" in key.demos else p for p in theta_prompts(key)]
        )
    cases = [
        ("abcde", "k", "K"),
        ("fg", "mn", " MN"),
        ("hijklmnop", "q", "Q"),
        ("rs", "tuvw", "T"),
        ("abcde", "k", "KK"),
        ("abcde", "st", "S"),
    ]
    requests = [
        Instance(
            "loglikelihood",
            {},
            ("".join(f"example:{d}->{d.upper()}\n" for d in demos) + f"example:{q}->", cont),
            i,
            ("t", i, 1),
        )
        for i, (demos, q, cont) in enumerate(cases)
    ]
    plans = lm.planner.plan(requests)
    assert plans[0].theta_key == plans[5].theta_key  # two queries after one S (and its dummies): S runs once for both
    fulls = [lm.encode_pair(*r.args) for r in requests]
    layers = list(range(len(lm.blocks)))
    scores = sweep.regular_and_thetas(lm, plans, fulls, layers, "t")
    wanted = {(layer, p.theta_key) for p in plans for layer in layers}
    fresh = ThetaStore(lm.model, lm.blocks, lm.tok_encode, lambda: lm.extract_batch_size, lm.autocast)
    fresh.prompts = lm.thetas.prompts  # the same [S, x'] tokens (changed above when unshared)
    fresh.ensure(wanted)
    assert len(lm.thetas) == len(fresh) == len(wanted) and not lm.thetas.missing(wanted)
    for layer, key in wanted:
        assert torch.allclose(lm.thetas.get(layer, key), fresh.get(layer, key), atol=1e-4), (layer, key)
    for i, (ctx, cont) in enumerate(fulls):
        with torch.no_grad():
            logprobs = lm.model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        assert scores[i, 0].item() == pytest.approx(
            sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)), abs=1e-4
        )
        assert scores[i, 1].item() == float(logprobs[len(ctx) - 1].argmax().item() == cont[0])


def test_length_chunks_pad_each_chunk_by_at_most_an_eighth(monkeypatch):
    monkeypatch.setattr(sweep, "ROW_CHUNK", 3)
    lengths = {"a": 1, "b": 9, "c": 8, "d": 1, "e": 2, "f": 1, "g": 1, "h": 8}
    # Longest first. [b, c, h]: 27 padded for 25 real, within an eighth (28.1), and full at ROW_CHUNK 3. [e] then
    # [a, d, f]: e with a would pad 4 for 3. g starts the fourth chunk because the third is full.
    assert sweep.length_chunks(lengths, lengths.get) == [["b", "c", "h"], ["e"], ["a", "d", "f"], ["g"]]
    assert sweep.length_chunks([], len) == []
    # With a floor of 20 tokens: [e, a, d] pads to 6 for 4 real tokens, more than an eighth but within the floor.
    assert sweep.length_chunks(lengths, lengths.get, 20) == [["b", "c", "h"], ["e", "a", "d"], ["f", "g"]]


def test_fork_scores_run_every_block_when_replaying_does_not_reproduce_a_full_pass(make_lm, monkeypatch):
    """An architecture whose blocks read more than their inputs and own KV cache (here: replayed outputs off by
    1e-3): the first chunk's check catches it, warns, and every patch runs in full, with the scores an exact
    replay gives, with or without an unpatched entry among the patches."""
    lm = make_lm("llama")
    rows = [([5, 6, 7, 8], [9]), ([5, 6], [10, 11, 12, 13]), ([20, 21, 22], [23, 24])]
    key = ThetaKey(demos="d", dummies=(), strip=False)
    patches = [[Plan(query="", theta_key=key, layer=layer)] * len(rows) for layer in range(len(lm.blocks))]
    for layer in range(len(lm.blocks)):
        lm.thetas.put(layer, key, torch.randn(lm.model.config.hidden_size))
    exact = sweep.fork_scores(lm, rows, [None, *patches])
    real = sweep.replay_outputs
    monkeypatch.setattr(
        sweep, "replay_outputs", lambda blocks, outputs, copies: real(blocks, [o + 1e-3 for o in outputs], copies)
    )
    assert torch.allclose(sweep.fork_scores(lm, rows, [None, *patches]), exact, atol=1e-5)
    assert any("runs every block for every patch" in message for message in lm._warned)
    lm._warned.clear()
    assert torch.allclose(sweep.fork_scores(lm, rows, patches), exact[1:], atol=1e-5)
    assert any("runs every block for every patch" in message for message in lm._warned)


def test_no_effect_when_the_best_block_does_not_beat_the_query_alone():
    baseline = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    same = torch.stack([baseline, baseline & False])
    summary = sweep.summary(same, baseline, baseline)
    assert summary["layer"] == 0 and summary["no_effect"] and summary["p_value"] == 1.0
    gains = torch.stack([baseline | True, baseline])  # 8 documents gained, none lost: p = 2 / 2**8
    regular = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    summary = sweep.summary(gains, baseline, regular)
    assert not summary["no_effect"] and summary["p_value"] == round(2 / 256, 4)
    assert summary["dev_accuracy"] == [1.0, 0.2] and summary["baseline_accuracy"] == 0.2
    assert summary["regular_accuracy"] == 0.3 and summary["num_dev"] == 10
    few = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # 3 gained, 1 lost: p = 2 * 5 / 16
    summary = sweep.summary(torch.stack([few, few & False]), torch.tensor([0, 0, 0, 1] + [0] * 6).bool(), few)
    assert summary["no_effect"] and summary["p_value"] == 0.625  # more gained than lost, but not significantly
    worse = sweep.summary(torch.zeros(2, 10, dtype=torch.bool), torch.ones(10, dtype=torch.bool), few)
    assert worse["no_effect"] and worse["p_value"] == round(2 / 1024, 4)  # significant, but a loss


def test_rerun_reuses_the_cached_choice_and_a_changed_model_does_not(make_lm, layer_cache):
    first = run_task(make_lm("llama", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    again = run_task(make_lm("llama", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    assert again["tv_list_first"]["source"].endswith(".json")
    assert again["tv_list_first"]["dev_accuracy"] == first["tv_list_first"]["dev_accuracy"]
    other = run_task(make_lm("qwen2", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    assert other["tv_list_first"]["source"] == "sweep"
    assert len(list(layer_cache.glob("*.json"))) == 2


def test_changing_one_blocks_mlp_or_num_dummy_changes_the_cache_key(make_lm, model_factory, tokenizer, layer_cache):
    from lm_eval_taskvec.model import TaskVectorLM

    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=6)
    sets = dev_sets(lm.settings, "tv_list_first")
    key = key_of(lm, "tv_list_first", sets)
    assert key_of(make_lm("llama", mode="hypothesis", num_dev=6), "tv_list_first", sets) == key
    assert key_of(make_lm("llama", mode="hypothesis", num_dev=6, num_dummy=3), "tv_list_first", sets) != key
    edited = copy.deepcopy(model_factory("llama"))
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one weight, off any strided sample
    other = TaskVectorLM(pretrained=edited, tokenizer=tokenizer, device="cpu", mode="hypothesis", num_dev=6)
    edited_key = key_of(other, "tv_list_first", sets)
    assert edited_key != key
    with torch.no_grad():
        edited.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # in place, after a fingerprint was remembered
    assert key_of(other, "tv_list_first", sets) not in (key, edited_key)


def test_another_commit_revision_or_config_of_the_same_weights_changes_the_cache_key(make_lm, monkeypatch):
    requests_of(make_task(), limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=4)
    sets = dev_sets(lm.settings, "tiny")
    key = key_of(lm, "tiny", sets)
    changes = [
        (lm.model.config, "_commit_hash", "0123abc"),  # another Hub commit: a new tokenizer, say
        (lm, "revision", "other-branch"),
        (lm.model.config, "rope_theta", 20000.0),  # same weights, other outputs
        (lm.model.config, "compute_dtype", torch.float16),
    ]  # not JSON: remote-code configs hold such values
    for owner, name, value in changes:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, value, raising=False)
            assert key_of(lm, "tiny", sets) != key, name
    assert key_of(lm, "tiny", sets) == key


def complete_choice(folds: bool = False, **changes) -> dict:
    """A layer choice for a 3-block model with every field a sweep records, written out here by hand."""
    part = {
        "layer": 1,
        "dev_accuracy": [0.1, 0.2, 0.3],
        "baseline_accuracy": 0.1,
        "regular_accuracy": 0.5,
        "no_effect": False,
        "p_value": 0.01,
        "num_dev": 10,
    }
    choice = {"task": "tiny", **part, "dev_split": "validation", "dev_docs": [1, 2]}
    if folds:
        choice |= {
            "folds": [part | {"scored_fold": 0, "dev_docs": [1]}, part | {"scored_fold": 1, "dev_docs": [2]}],
            "num_docs": 26,
            "fold_seed": 0,
        }
    return choice | changes


def with_fold(index: int, **changes) -> dict:
    choice = complete_choice(folds=True)
    choice["folds"][index] |= changes
    return choice


BAD_CACHE_FILES = {
    "truncated": json.dumps(complete_choice())[:-12],
    "not an object": "[1, 2, 3]",
    "wrong type": json.dumps(complete_choice(layer="1")),
    "out of range": json.dumps(complete_choice(layer=7)),
    "curve of the wrong length": json.dumps(complete_choice(dev_accuracy=[0.1, 0.2])),
    "a bool is not a layer": json.dumps(complete_choice(layer=True)),
    "one past the last block": json.dumps(complete_choice(layer=3)),
    "one half": json.dumps(complete_choice(folds=True) | {"folds": complete_choice(folds=True)["folds"][:1]}),
    "a bad half": json.dumps(with_fold(1, layer="1")),
    "no fold seed": json.dumps({k: v for k, v in complete_choice(folds=True).items() if k != "fold_seed"}),
    "halves that are not objects": json.dumps(complete_choice(folds=True) | {"folds": [1, 2]}),  # crashed once
    "no baseline accuracy": json.dumps({k: v for k, v in complete_choice().items() if k != "baseline_accuracy"}),
}
MORE_BAD_CACHE_FILES = {  # the same check, without a sweep each
    "null halves": json.dumps(complete_choice(folds=True) | {"folds": [None, None]}),
    "halves not in a list": json.dumps(complete_choice(folds=True) | {"folds": {"0": complete_choice()}}),
    "three halves": json.dumps(with_fold(0) | {"folds": [*with_fold(0)["folds"], with_fold(0)["folds"][0]]}),
    "num_docs a string": json.dumps(complete_choice(folds=True, num_docs="26")),
    "no num_docs": json.dumps({k: v for k, v in complete_choice(folds=True).items() if k != "num_docs"}),
    "fold_seed a string": json.dumps(complete_choice(folds=True, fold_seed="0")),
    "a half without scored_fold": json.dumps(with_fold(0, scored_fold=None)),
    "both halves scored_fold 0": json.dumps(with_fold(1, scored_fold=0)),
    "scored_fold past the halves": json.dumps(with_fold(1, scored_fold=2)),
    "a negative layer": json.dumps(complete_choice(layer=-1)),
    "a curve with text": json.dumps(complete_choice(dev_accuracy=[0.1, "0.2", 0.3])),
    "regular accuracy as text": json.dumps(complete_choice(regular_accuracy="0.5")),
    "no p_value": json.dumps({k: v for k, v in complete_choice().items() if k != "p_value"}),
    "no_effect as text": json.dumps(complete_choice(no_effect="false")),
    "num_dev as a float": json.dumps(complete_choice(num_dev=10.0)),
    "no dev_split": json.dumps({k: v for k, v in complete_choice().items() if k != "dev_split"}),
    "a half without p_value": json.dumps(with_fold(0, p_value=None)),
}


@pytest.mark.parametrize("content", BAD_CACHE_FILES.values(), ids=BAD_CACHE_FILES)
def test_a_bad_cache_file_is_discarded_with_a_warning_and_reswept(make_lm, layer_cache, caplog, content):
    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=6)
    path = layer_cache / f"{key_of(lm, 'tv_list_first', dev_sets(lm.settings, 'tv_list_first'))}.json"
    layer_cache.mkdir(parents=True)
    path.write_text(content)
    choice = selection.select_layer(lm, "tv_list_first")
    assert choice["source"] == "sweep" and "sweeping again" in caplog.text
    assert json.loads(path.read_text())["dev_accuracy"] == choice["dev_accuracy"]  # healed


@pytest.mark.parametrize(
    "content",
    [*BAD_CACHE_FILES.values(), *MORE_BAD_CACHE_FILES.values()],
    ids=[*BAD_CACHE_FILES, *MORE_BAD_CACHE_FILES],
)
def test_a_cache_file_missing_anything_a_choice_is_read_for_is_no_choice(tmp_path, caplog, content):
    path = tmp_path / "key.json"
    path.write_text(content)
    assert cache.read_choice(path, 3) is None and "sweeping again" in caplog.text
    assert str(path) in caplog.text  # names the file


@pytest.mark.parametrize(
    "choice",
    [
        complete_choice(),
        complete_choice(folds=True),
        complete_choice(folds=True) | {"folds": complete_choice(folds=True)["folds"][::-1]},
        complete_choice(layer=0, dev_accuracy=[1, 0, 0]),
        complete_choice(layer=2),
    ],
    ids=["one layer", "cross-fitted", "halves in the other order", "integer curve", "last block"],
)
def test_a_complete_cache_file_is_read_back_as_written(tmp_path, caplog, choice):
    path = tmp_path / "key.json"
    path.write_text(json.dumps(choice))
    assert cache.read_choice(path, 3) == choice and "sweeping again" not in caplog.text


def test_a_cross_fitted_choice_is_reused_from_the_cache(make_lm, layer_cache, monkeypatch):
    task = make_task(splits={"test": letter_rows(26)}, fewshot_split="test", num_fewshot=3)
    requests_of(task, limit=1)
    fake = iter([[0, 1, 0], [2, 0, 0]])
    monkeypatch.setattr(
        sweep,
        "score",
        lambda lm, name, sets: [
            (
                torch.tensor([next(fake)] * 4).T.bool(),
                torch.zeros(4, dtype=torch.bool),
                torch.zeros(4, dtype=torch.bool),
            )
            for _ in sets
        ],
    )
    first = selection.select_layer(make_lm("gpt2", mode="hypothesis", num_dev=12), "tiny")
    monkeypatch.setattr(sweep, "score", lambda *a: pytest.fail("swept again although the cache holds the choice"))
    again = selection.select_layer(make_lm("gpt2", mode="hypothesis", num_dev=12), "tiny")
    assert first["source"] == "sweep" and again["source"].endswith(".json")
    assert [f["layer"] for f in again["folds"]] == [1, 0] and again["folds"] == first["folds"]


def test_an_unwritable_cache_keeps_the_choice_in_memory(make_lm, layer_cache, caplog, monkeypatch):
    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)
    lm = make_lm("llama", mode="hypothesis", num_dev=6)
    monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    choice = selection.select_layer(lm, "tv_list_first")
    assert choice["source"] == "sweep" and "not writable" in caplog.text
    assert selection.select_layer(lm, "tv_list_first") is choice  # remembered, not swept again
    assert [p.name for p in layer_cache.glob("*")] == [".lock"]  # the folder's lock, no temporary file left behind


def test_the_cache_file_is_written_in_its_own_folder_without_the_system_temp_folder(layer_cache, monkeypatch):
    import tempfile
    from types import SimpleNamespace

    monkeypatch.setattr(tempfile, "tempdir", str(layer_cache.parent / "no-such-folder"))  # unusable, like another disk
    lm = SimpleNamespace(warn_once=lambda message: pytest.fail(message))
    path = layer_cache / "key.json"
    cache.write_choice(path, complete_choice() | {"source": "sweep"}, lm.warn_once)
    assert json.loads(path.read_text()) == complete_choice()  # "source" says where a choice came from: not stored
    assert [p.name for p in layer_cache.iterdir()] == ["key.json"]


def test_a_cache_that_cannot_be_written_or_cleaned_up_only_warns(layer_cache, monkeypatch):

    def refuse(*args):
        raise PermissionError(13, "read-only")

    monkeypatch.setattr(cache.os, "replace", refuse)
    monkeypatch.setattr(cache.os, "unlink", refuse)  # the temporary file cannot be removed either
    warnings = []
    cache.write_choice(layer_cache / "key.json", complete_choice(), warnings.append)
    assert len(warnings) == 1 and "not writable" in warnings[0] and not (layer_cache / "key.json").exists()


def test_the_weights_fingerprint_is_remembered_until_a_weight_changes(model_factory, monkeypatch):
    model = copy.deepcopy(model_factory("llama"))
    first = identity.weights_fingerprint(model)
    with monkeypatch.context() as patch:
        patch.setattr(identity.torch.linalg, "vector_norm", lambda *a, **k: pytest.fail("fingerprinted again"))
        assert identity.weights_fingerprint(model) == first
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert identity.weights_fingerprint(model) != first


@pytest.mark.parametrize(
    "spelling, setting",
    [
        ("no", "off"),
        ("off", "off"),
        ("false", "off"),
        ("0", "off"),
        (False, "off"),
        (True, "on"),
        ("refresh", "refresh"),
    ],
)
def test_layer_cache_spellings(make_lm, spelling, setting):
    assert make_lm(mode="hypothesis", layer=1, layer_cache=spelling).settings.layer_cache == setting


def test_refresh_sweeps_again_and_rewrites(make_lm, layer_cache):
    run_task(make_lm("llama", mode="hypothesis", num_dev=6))
    again = run_task(make_lm("llama", mode="hypothesis", num_dev=6, layer_cache="refresh"))
    assert again["config"]["taskvec"]["layer_selection"]["tv_list_first"]["source"] == "sweep"
    assert len(list(layer_cache.glob("*.json"))) == 1


@pytest.mark.parametrize("mode", ["regular", "baseline"])
def test_only_hypothesis_runs_record_a_layer(make_lm, layer_cache, mode):
    info = run_task(make_lm("llama", mode=mode), limit=2)["config"]["taskvec"]
    assert info == {"mode": mode}


def test_the_layer_choice_does_not_depend_on_the_rank(make_lm, layer_cache):
    task = make_task()
    keys = []
    for rank in (0, 1):
        task.set_fewshot_seed(1234)
        task.build_all_requests(rank=rank, world_size=2)
        lm = make_lm("llama", mode="hypothesis", num_dev=6)
        keys.append(key_of(lm, "tiny", dev_sets(lm.settings, "tiny")))
    assert keys[0] == keys[1]


def test_concurrent_writers_never_leave_half_a_cache_file(make_lm, layer_cache, caplog):
    import threading

    lm = make_lm("llama", mode="hypothesis", layer=1)
    path = layer_cache / "key.json"
    choices = [complete_choice(layer=layer, padding="y" * 200_000) for layer in (0, 2)]
    seen, stop = [], threading.Event()

    def write(choice):
        for _ in range(40):
            cache.write_choice(path, choice, lm.warn_once)

    def read():
        while not stop.is_set():
            seen.append(cache.read_choice(path, 3))

    writers = [threading.Thread(target=write, args=(c,)) for c in choices]
    reader = threading.Thread(target=read)
    reader.start()
    [w.start() for w in writers]
    [w.join() for w in writers]
    stop.set()
    reader.join()
    assert all(s is None or s["layer"] in (0, 2) for s in seen) and any(s is not None for s in seen)
    assert "sweeping again" not in caplog.text  # no reader ever saw a partial file
    assert [p.name for p in layer_cache.iterdir()] == ["key.json"]  # no temporary file left


def test_no_effect_is_a_warning_in_the_log_and_a_flag_in_the_choice(make_lm, layer_cache, monkeypatch, caplog):
    task = make_task()
    requests_of(task, limit=1)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=10, layer_cache="off")
    same = torch.tensor([True, False] * 5)
    monkeypatch.setattr(sweep, "score", lambda lm, name, sets: [(torch.stack([same] * 3), same, same)])
    choice = selection.select_layer(lm, "tiny")
    assert choice["no_effect"] and choice["baseline_accuracy"] == choice["dev_accuracy"][0] == 0.5
    assert choice["task"] == "tiny" and choice["dev_split"] == "validation"
    assert "tiny: block 0 (0-based) of 3 blocks" in caplog.text and "NO EFFECT" in caplog.text


def test_query_pool_follows_the_task_object_loaded_under_its_name(make_lm, monkeypatch):
    """Dummies come from the pool of the task lm-eval loaded last under a name (a task loaded again with other
    documents gets its own pool, not the first one's), and a loaded object without documents has none."""
    from lm_eval_taskvec._autoload import LOADED_TASKS

    lm = make_lm()
    rows = letter_rows(26)
    first = make_task("pool", splits={"train": rows[:8], "test": rows[8:14]})
    second = make_task("pool", splits={"train": rows[:8], "test": rows[14:20]})
    monkeypatch.setitem(LOADED_TASKS, "pool", first)
    first_pool = lm.planner.query_pool("pool")
    monkeypatch.setitem(LOADED_TASKS, "pool", second)
    second_pool = lm.planner.query_pool("pool")
    assert {query.split(":")[1].split("->")[0] for query in first_pool} == {row["input"] for row in rows[8:14]}
    assert {query.split(":")[1].split("->")[0] for query in second_pool} == {row["input"] for row in rows[14:20]}
    monkeypatch.setitem(LOADED_TASKS, "pool", object())
    assert lm.planner.query_pool("pool") == set()


def test_a_cross_fitted_task_scores_each_document_at_its_own_halfs_layer(make_lm):
    lm = make_lm(layer="auto")
    folds = fold_members(10, 7)
    lm.layer_choices["t"] = {
        "task": "t",
        "num_docs": 10,
        "fold_seed": 7,
        "folds": [{"scored_fold": 0, "layer": 1}, {"scored_fold": 1, "layer": 2}],
    }
    layers = {doc: lm.layer_for(Instance("generate_until", {}, ("x", {}), doc, ("t", doc, 1))) for doc in range(10)}
    assert layers == {doc: 1 if doc in folds[0] else 2 for doc in range(10)}
    assert set(layers.values()) == {1, 2}


@pytest.mark.parametrize("kind", ["generate_until", "multiple_choice"])
def test_the_sweep_under_a_sliding_window_shorter_than_its_prompts_equals_the_evaluation_paths(
    make_lm, tokenizer, layer_cache, kind
):
    """Mistral with a 4-token window, prompts of 20-40 tokens: the sweep may neither widen the window with a
    4D mask nor shift it with left padding or holes; each block's dev scores, baseline's and regular's equal
    the evaluation paths run one request at a time (no padding at all)."""
    model = make_model("mistral", len(tokenizer), sliding_window=4)
    if kind == "generate_until":
        run_task(make_lm(pretrained=model, mode="hypothesis", layer=1), limit=1)  # loads tv_list_first
        name = "tv_list_first"
    else:
        task = make_task(output_type="multiple_choice", doc_to_choice="{{[answers[0], input, 'zz']}}", doc_to_target=0)
        requests_of(task, limit=1)
        name = "tiny"
    lm = make_lm(pretrained=model, mode="hypothesis", num_dev=6)
    (dev,) = dev_sets(lm.settings, name)
    ((per_block, baseline, regular),) = sweep.score(lm, name, [dev])
    requests = [r for ex in dev.examples for r in ex.requests]

    def evaluated(mode, layer=0):
        alone = make_lm(pretrained=model, mode=mode, layer=layer, batch_size=1)
        if kind == "generate_until":
            one = [
                Instance(kind, r.doc, (r.args[0], {**r.args[1], "max_gen_toks": 1}), r.idx, r.metadata)
                for r in requests
            ]
            targets = [lm.tok_encode(ex.gold, add_special_tokens=False)[:1] for ex in dev.examples]
            return [
                alone.tok_encode(g, add_special_tokens=False)[:1] == t
                for g, t in zip(alone.generate_until(one), targets)
            ]
        scores = [lp for lp, _ in alone.loglikelihood(requests)]
        return [max(range(3), key=lambda c: scores[3 * i + c]) == ex.gold for i, ex in enumerate(dev.examples)]

    for layer in range(len(lm.blocks)):
        assert per_block[layer].tolist() == evaluated("hypothesis", layer), layer
    assert baseline.tolist() == evaluated("baseline") and regular.tolist() == evaluated("regular")


def test_dev_prompts_render_once_per_task_and_shots_in_a_process(make_lm, layer_cache, monkeypatch):
    """The cache key is built from the dev prompts, which lm-eval renders slowly: a model asking again (the
    regular run preparing θ, then the hypothesis run) renders them once; other shots render them again."""
    from lm_eval_taskvec.selection import dev

    task = make_task()
    requests = requests_of(task, limit=4)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=6)
    rendered, render = [], dev.few_shot_requests
    monkeypatch.setattr(dev, "few_shot_requests", lambda *a, **k: rendered.append(a[2]) or render(*a, **k))
    first = lm.plan(requests)
    assert lm.plan(requests) == first and rendered == [3]
    task.set_config(key="num_fewshot", value=2)
    lm.plan(requests_of(task, limit=4))
    assert rendered == [3, 2]


def _sweep_once_in_a_process(folder: str, setting: str, log: str) -> None:
    import os
    import time as clock

    os.environ["LM_EVAL_TASKVEC_CACHE"] = folder

    def swept():
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        clock.sleep(0.5)  # long enough for the other process to arrive while this one sweeps
        return complete_choice()

    choice = cache.LayerCache(setting, print).read_or_sweep("key", 3, swept)
    with open(log + ".got", "a") as file:
        file.write(f"{choice['source'] == 'sweep'}\n")


@pytest.mark.parametrize("setting", ["on", "refresh"])
def test_processes_sharing_the_cache_folder_sweep_a_key_once(tmp_path, setting):
    """Two processes of one run (accelerate launch) arriving at the same choice: the first sweeps, the other
    waits for it and reads its file; refresh too (a file written by this run is fresh)."""
    import multiprocessing

    log = str(tmp_path / "sweeps")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_sweep_once_in_a_process, args=(str(tmp_path), setting, log)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(open(log).read().split()) == 1  # one sweep
    assert sorted(open(log + ".got").read().split()) == ["False", "True"]  # one swept, one read the file
