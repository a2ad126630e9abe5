"""Invariants of θ extraction and patching, on tiny random models of seven architectures."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance

import lm_eval_taskvec.extraction as extraction
import lm_eval_taskvec.layers as layers
import lm_eval_taskvec.model as model_module
import lm_eval_taskvec.theta as theta_module
from lm_eval_taskvec.extraction import prefill
from lm_eval_taskvec.layers import write_states
from tests.helpers import ARCHITECTURES, GEN, context, gen_requests, ll_requests, logits, make_model, query_of


@pytest.fixture
def records(monkeypatch):
    """Every PatchRecord the model creates, to count hook calls and patches."""
    seen = []

    def spy(*args, **kwargs):
        cm = write_states(*args, **kwargs)

        class Wrapped:
            def __enter__(self):
                record = cm.__enter__()
                seen.append((args, kwargs, record))
                return record

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(layers, "write_states", spy)
    return seen


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_theta_from_full_prompt_at_last_block_reproduces_regular_logits(make_lm, arch):
    lm = make_lm(arch, mode="hypothesis", layer=-1)
    full = context("abcde", "k")
    last = len(lm.blocks) - 1
    theta = lm.thetas.last_token_states([[lm.tok_encode(full)]], [last])[0, :, 0]
    query = torch.tensor([lm.tok_encode("example:k->")])
    regular = logits(lm, full)[-1]
    with write_states(lm.blocks[last], theta, -1) as record:
        patched = lm._model_call(query)[0, -1]
    assert record.patched == 1
    torch.testing.assert_close(patched, regular, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(lm._model_call(query)[0, -1], regular, atol=1e-3)  # the patch did the work


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patching_a_runs_own_state_changes_nothing(make_lm, arch):
    lm = make_lm(arch, mode="hypothesis", layer=0)
    text = context("abc", "d")
    ids = torch.tensor([lm.tok_encode(text)])
    base = lm._model_call(ids)
    layers = list(range(len(lm.blocks)))
    states = lm.thetas.last_token_states([[lm.tok_encode(text)]], layers)[:, :, 0]
    for layer in layers:
        with write_states(lm.blocks[layer], states[layer], -1) as record:
            out = lm._model_call(ids)
        assert record.patched == 1
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch,case",
    [(arch, "branches") for arch in ARCHITECTURES]
    + [("llama", "no 4D mask"), ("gpt2", "no 4D mask"), ("llama", "short sliding window")],
)
def test_prefix_shared_extraction_equals_a_full_forward_per_prompt(make_lm, monkeypatch, arch, case):
    """Families of different prefix and suffix lengths in one batch: each family's S once and its dummies'
    suffixes as branches after it, in one pass per batch; or, where a model takes no 4D mask or a sliding
    window is shorter than the prompts, a left-padded prefix into a KV cache, then the suffixes (two passes)."""
    lm = make_lm(arch, mode="hypothesis", layer=1, batch_size=3)
    monkeypatch.setattr(lm.model, "_taskvec_branch_mask", None if case == "no 4D mask" else "bool", raising=False)
    asked = []  # the widths extraction asks a sliding window to cover
    monkeypatch.setattr(
        extraction, "within_window", lambda model, width: asked.append(width) or case != "short sliding window"
    )
    branches = case == "branches"
    families = [
        [context(d, q) for q in queries]
        for d, queries in [("abcdefgh", ("k", "mno")), ("a", ("bc", "d")), ("abc", ("de", "f")), ("xy", ("z", "uvw"))]
    ]
    layers = list(range(len(lm.blocks)))
    passes = []
    counter = lm.model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        shared = lm.thetas.last_token_states([[lm.tok_encode(p) for p in f] for f in families], layers)
    finally:
        counter.remove()
    batches = -(-len(families) // 3)  # batch_size=3 families per extraction batch
    if branches:
        assert len(passes) == batches
    else:  # S into a KV cache, then the suffixes
        assert batches <= len(passes) <= 2 * batches
    assert asked == [max(len(lm.tok_encode(p)) for f in families for p in f)]
    for f, family in enumerate(families):
        for j, prompt in enumerate(family):
            full = lm.model(torch.tensor([lm.tok_encode(prompt)]), output_hidden_states=True).hidden_states
            for layer in layers:
                # hidden_states[layer + 1] is block `layer`'s output, except the last, which is after the final norm
                if layer < len(layers) - 1:
                    torch.testing.assert_close(shared[layer, f, j], full[layer + 1][0, -1], rtol=1e-4, atol=1e-4)
    for layer in layers:  # the last block, against an unshared run of the same reader
        alone = lm.thetas.last_token_states([[lm.tok_encode(families[1][0])]], [layer])[0, 0, 0]
        torch.testing.assert_close(shared[layer, 1, 0], alone, rtol=1e-4, atol=1e-4)


def test_extraction_under_a_real_sliding_window_equals_a_full_forward_per_prompt(make_lm, tokenizer):
    """Mistral with a 4-token window, families whose S lengths differ by ten windows in one batch: the window
    must neither widen (a 4D mask) nor move (left padding): θ at every block is one plain pass's output."""
    lm = make_lm(pretrained=make_model("mistral", len(tokenizer), sliding_window=4), mode="hypothesis", layer=1)
    families = [[context(d, q) for q in queries] for d, queries in [("abcdefgh", ("k", "mno")), ("a", ("bc", "d"))]]
    layers = list(range(len(lm.blocks) - 1))  # hidden_states of the last block come after the final norm
    shared = lm.thetas.last_token_states([[lm.tok_encode(p) for p in f] for f in families], layers)
    for f, family in enumerate(families):
        for j, prompt in enumerate(family):
            full = lm.model(torch.tensor([lm.tok_encode(prompt)]), output_hidden_states=True).hidden_states
            for layer in layers:
                torch.testing.assert_close(shared[layer, f, j], full[layer + 1][0, -1], rtol=1e-4, atol=1e-4)


def test_hook_replaces_only_the_given_position_of_each_row(make_lm):
    lm = make_lm("llama", mode="hypothesis", layer=1)
    texts = [context("abcde", "k"), context("ab", "c")]
    enc = [lm.tok_encode(t) for t in texts]
    width = max(map(len, enc))
    inps = torch.zeros(2, width, dtype=torch.long)
    for r, e in enumerate(enc):
        inps[r, : len(e)] = torch.tensor(e)
    base = lm._model_call(inps)
    positions = torch.tensor([3, 5])
    values = torch.randn(2, lm.model.config.hidden_size)
    with write_states(lm.blocks[1], values, positions):
        out = lm._model_call(inps)
    for r, p in enumerate(positions.tolist()):
        torch.testing.assert_close(out[r, :p], base[r, :p])  # causal: earlier positions untouched
        assert not torch.allclose(out[r, p], base[r, p], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_batched_equals_one_by_one_and_decode_steps_are_not_patched(make_lm, records, monkeypatch, arch):
    reqs = gen_requests()
    batched = make_lm(arch, mode="hypothesis", layer=1, batch_size=4).generate_until(reqs)
    assert all(rec.patched == 1 for *_, rec in records)
    assert any(rec.calls > 1 for *_, rec in records)  # decode steps ran through the block, unpatched
    monkeypatch.setattr(model_module, "MAX_BATCH_GROWTH", 1)  # really one row per batch
    single = make_lm(arch, mode="hypothesis", layer=1, batch_size=1).generate_until(reqs)
    assert batched == single


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_an_added_theta_patches_the_prompt_pass_once_and_no_decode_step(make_lm, records, monkeypatch, arch):
    reqs = gen_requests()
    batched = make_lm(arch, mode="hypothesis", layer=1, op="add", scale=2.0, batch_size=4).generate_until(reqs)
    assert records and all(rec.patched == 1 for *_, rec in records)
    assert any(rec.calls > 1 for *_, rec in records)  # decode steps ran through the block, unpatched
    assert all(bool(args[5].all()) for args, _, _ in records)  # every row's θ added, none replaced
    monkeypatch.setattr(model_module, "MAX_BATCH_GROWTH", 1)  # really one row per batch
    single = make_lm(arch, mode="hypothesis", layer=1, op="add", scale=2.0, batch_size=1).generate_until(reqs)
    assert batched == single


def test_generate_patches_the_prompts_last_token_with_its_own_theta(make_lm, monkeypatch):
    """Each row's first generated token (one token, no stop string) is the argmax of a forward pass of its query
    alone with its own θ (the mean over its dummies of block 1's output after [S, x'], read here from
    hidden_states) written at the query's last token; for some rows that is not the unpatched argmax."""
    lm = make_lm("gpt2", mode="hypothesis", layer=1)
    reqs = [
        Instance(
            "generate_until", {}, (r.args[0], {"until": [], "do_sample": False, "max_gen_toks": 1}), r.idx, r.metadata
        )
        for r in gen_requests()
    ]
    generated = {}  # query tokens -> the one token generated after them
    model_generate = lm._model_generate

    def spy(context, max_length, stop, **kwargs):
        out = model_generate(context, max_length, stop, **kwargs)
        for row, mask, new in zip(context, kwargs["attention_mask"], out[:, context.shape[1] :]):
            generated[tuple(row[mask.bool()].tolist())] = new.tolist()
        return out

    monkeypatch.setattr(lm, "_model_generate", spy)
    lm.generate_until(reqs)
    patched_differs = []
    for plan in lm.plan(reqs):
        assert plan.layer == 1 and not plan.theta_key.strip
        states = [
            lm.model(
                torch.tensor([lm.tok_encode(plan.theta_key.demos + dummy)]), output_hidden_states=True
            ).hidden_states[2][0, -1]
            for dummy in plan.theta_key.dummies
        ]
        query = lm.tok_encode(plan.query)
        with torch.no_grad(), write_states(lm.blocks[1], torch.stack(states).mean(0)[None], -1) as record:
            patched = lm.model(torch.tensor([query])).logits[0, -1].argmax().item()
        assert record.patched == 1
        assert generated[tuple(query)] == [patched]
        with torch.no_grad():
            patched_differs.append(patched != lm.model(torch.tensor([query])).logits[0, -1].argmax().item())
    assert len(generated) == len(reqs) and any(patched_differs)  # every row seen; θ changes some first tokens


def test_loglikelihood_matches_a_manual_patched_run_for_every_row(make_lm, records):
    lm = make_lm("gpt2", mode="hypothesis", layer=1)
    reqs = ll_requests()
    results = lm.loglikelihood(reqs)
    assert records and all(rec.patched == 1 and rec.calls == 1 for *_, rec in records)
    for req, plan, (logprob, _) in zip(reqs, lm.plan(reqs), results):
        ctx, cont = lm.encode_pair(plan.query, req.args[1])
        ids = torch.tensor([ctx + cont])
        with write_states(lm.blocks[1], lm.thetas.get(plan.layer, plan.theta_key)[None], len(ctx) - 1):
            logp = torch.log_softmax(lm._model_call(ids[:, :-1])[0], -1)
        expected = logp[len(ctx) - 1 :].gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("case", ["a one-token query", "query and continuation fill max_length"])
def test_loglikelihood_at_the_edges_matches_a_manual_patched_run(make_lm, case):
    """θ at position 0 (a one-token query), and rows exactly as long as HFLM allows (max_length + 1 tokens)."""
    reqs = [
        Instance("loglikelihood", {}, (f"aA\nbB\ncC\n{q}", c), i, ("t", i, 1))
        for i, (q, c) in enumerate([("k", "K"), ("m", "MM"), ("bb", "B"), ("q", "Q")])
    ]
    if case == "a one-token query":
        lm = make_lm("gpt2", mode="hypothesis", layer=1)
    else:
        probe = make_lm("gpt2", mode="baseline")
        longest = max(len(probe.tok_encode(r.args[0].rpartition("\n")[2] + r.args[1])) for r in reqs)
        lm = make_lm("gpt2", mode="hypothesis", layer=1, max_length=longest - 1)
    plans = lm.plan(reqs)
    encoded = [lm.encode_pair(plan.query, req.args[1]) for req, plan in zip(reqs, plans)]
    if case == "a one-token query":
        assert len(encoded[0][0]) == 1
    else:
        assert max(len(ctx) + len(cont) for ctx, cont in encoded) == lm.max_length + 1
    for (logprob, _), plan, (ctx, cont) in zip(lm.loglikelihood(reqs), plans, encoded):
        with write_states(lm.blocks[1], lm.thetas.get(plan.layer, plan.theta_key)[None], len(ctx) - 1):
            logp = torch.log_softmax(lm._model_call(torch.tensor([ctx + cont])[:, :-1])[0], -1)
        assert logprob == pytest.approx(
            logp[len(ctx) - 1 :].gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_loglikelihood_batched_equals_one_by_one(make_lm, monkeypatch, arch):
    reqs = ll_requests()
    batched = make_lm(arch, mode="hypothesis", layer=1, batch_size=8).loglikelihood(reqs)
    monkeypatch.setattr(model_module, "MAX_BATCH_GROWTH", 1)
    single = make_lm(arch, mode="hypothesis", layer=1, batch_size=1).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_same_query_with_different_demonstrations_gets_its_own_theta(make_lm):
    # Two tasks send the same query text after different demonstrations: their rows must not share θ.
    lm = make_lm("llama", mode="hypothesis", layer=1, batch_size=8)
    reqs = [
        Instance("loglikelihood", {}, (context(d, "k"), "K"), i, (t, i, 1))
        for i, (d, t) in enumerate([("abc", "t1"), ("xyz", "t2"), ("abc", "t1"), ("xyz", "t2")])
    ]
    reqs += [
        Instance("loglikelihood", {}, (context(d, q), "Q"), 9, (t, 9, 1))
        for d, t in (("abc", "t1"), ("xyz", "t2"))
        for q in "mno"
    ]  # dummy pools of both tasks
    together = lm.loglikelihood(reqs)
    apart = [lm.loglikelihood([r] + reqs[4:])[0] for r in reqs[:4]]
    assert [lp for lp, _ in together[:4]] == pytest.approx([lp for lp, _ in apart], abs=1e-5)
    assert together[0][0] != pytest.approx(together[1][0], abs=1e-5)


@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
def test_baseline_equals_stock_hflm_on_the_query_alone(make_lm, kind):
    reqs = gen_requests() if kind == "generate_until" else ll_requests()
    ours = getattr(make_lm("qwen2", mode="baseline"), kind)(reqs)
    query_only = [Instance(kind, {}, (query_of(r.args[0]), r.args[1]), r.idx, ("t", r.idx, 1)) for r in reqs]
    stock = getattr(make_lm("qwen2", stock=True), kind)(query_only)
    assert ours == stock


@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
def test_regular_equals_stock_hflm(make_lm, kind):
    reqs = gen_requests() if kind == "generate_until" else ll_requests()
    assert getattr(make_lm("mistral", mode="regular"), kind)(reqs) == getattr(make_lm("mistral", stock=True), kind)(
        reqs
    )


def test_dummies_are_other_documents_queries_and_reproducible(make_lm):
    lm = make_lm("llama", mode="hypothesis", layer=1)
    reqs = gen_requests()
    plans = lm.plan(reqs)
    queries = {query_of(r.args[0]) for r in reqs}
    for plan in plans:
        dummies = plan.theta_key.dummies
        assert len(dummies) == 2 and plan.query not in dummies and set(dummies) <= queries
    assert plans == lm.plan(list(reversed(reqs)))[::-1]
    draws = {
        seed: [p.theta_key.dummies for p in make_lm("llama", mode="hypothesis", layer=1, seed=seed).planner.plan(reqs)]
        for seed in (1, 2, 3)
    }
    assert len({tuple(d) for d in draws.values()}) > 1  # the seed model arg draws the dummies


def test_query_only_batches_grow_within_the_token_budget(make_lm, records):
    """Query-only rows are shorter than the few-shot prompts batch_size was chosen for: a batch holds more of
    them, as long as its tokens stay within batch_size full prompts' (and at most MAX_BATCH_GROWTH x). Here the
    longest prompt is ~7x the longest query: more than batch_size rows per batch, fewer than 8x."""
    lm = make_lm("llama", mode="hypothesis", layer=1, batch_size=2)
    cases = [(d, q) for d in ("abcdefghij", "klmnopqr") for q in ("a", "bc", "d", "ef", "g", "hi", "j", "kl", "m")]
    reqs = [
        Instance("generate_until", {}, (context(d, q), dict(GEN)), i, ("t", i, 1)) for i, (d, q) in enumerate(cases)
    ]
    lm.generate_until(reqs)
    new = GEN["max_gen_toks"]
    full = max(len(lm.tok_encode(r.args[0])) for r in reqs) + new
    short = max(len(lm.tok_encode(query_of(r.args[0]))) for r in reqs) + new
    rows = [args[1].shape[0] for args, _, _ in records]  # each patched batch's rows
    assert sum(rows) == len(reqs) and len(rows) < len(reqs) / 2  # fewer batches than batch_size alone makes
    assert all(n * short <= 2 * full and n <= 2 * model_module.MAX_BATCH_GROWTH for n in rows)
    assert lm.batch_size_per_gpu == 2  # the user's batch size, back once the queries are done


def test_documents_sharing_demonstrations_share_theta(make_lm, records):
    lm = make_lm("llama", mode="hypothesis", layer=1)
    reqs = [
        Instance("generate_until", {}, (context("abcde", q), dict(GEN)), i, ("t", i, 1)) for i, q in enumerate("klmnop")
    ]
    plans = lm.plan(reqs)
    assert len({p.theta_key for p in plans}) <= 3  # all but the dummies' own documents share one θ
    assert len(lm.thetas) == len({p.theta_key for p in plans})


@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
def test_one_batch_patches_each_task_at_its_own_layer(make_lm, records, monkeypatch, kind):
    """layer=auto can choose different layers per task; their rows share batches but not layers."""

    def make(task: str, demos: str, queries: str):  # different queries, or the query-only rows coincide
        if kind == "generate_until":
            return [Instance(kind, {}, (context(demos, q), dict(GEN)), i, (task, i, 1)) for i, q in enumerate(queries)]
        return [
            Instance(kind, {}, (context(demos, q), c), i, (task, i, 1))
            for i, (q, c) in enumerate(zip(queries, ["K", " LL", "M", "N\nexample"]))
        ]

    mixed_lm = make_lm("gpt2", mode="hypothesis", layer=0, batch_size=16)
    monkeypatch.setattr(mixed_lm, "layer_for", lambda request: {"t1": 0, "t2": 2}[request.task_name])
    mixed = getattr(mixed_lm, kind)(make("t1", "abc", "klmn") + make("t2", "xyz", "pqrs"))
    assert sorted(rec.patched for *_, rec in records) == [1, 1]  # one batch, one hook per layer
    alone = getattr(make_lm("gpt2", mode="hypothesis", layer=0), kind)(make("t1", "abc", "klmn"))
    alone += getattr(make_lm("gpt2", mode="hypothesis", layer=2), kind)(make("t2", "xyz", "pqrs"))
    if kind == "loglikelihood":
        mixed, alone = [lp for lp, _ in mixed], [lp for lp, _ in alone]
        assert mixed == pytest.approx(alone, abs=1e-4)
    else:
        assert mixed == alone


def test_theta_is_the_mean_over_dummies_of_block_outputs_at_the_last_token(make_lm):
    """θ written out by hand from full forward passes of [S, x'] (hidden_states[L + 1] is block L's output)."""
    lm = make_lm("llama", mode="hypothesis", layer=1, num_dummy=3)
    reqs = gen_requests()
    plan = lm.plan(reqs)[0]
    assert len(plan.theta_key.dummies) == 3
    states = [
        lm.model(torch.tensor([lm.tok_encode(plan.theta_key.demos + dummy)]), output_hidden_states=True).hidden_states[
            2
        ][0, -1]
        for dummy in plan.theta_key.dummies
    ]
    torch.testing.assert_close(
        lm.thetas.get(plan.layer, plan.theta_key), torch.stack(states).mean(0), rtol=1e-4, atol=1e-4
    )
    assert not torch.allclose(
        lm.thetas.get(plan.layer, plan.theta_key), states[0], atol=1e-3
    )  # the dummies differ: the mean matters


def test_one_multi_layer_pass_equals_one_pass_per_layer(make_lm):
    """The sweep reads every block in one pass; each block's θ must be what a single-layer pass reads."""
    reqs = gen_requests()
    lm = make_lm("gpt2", mode="hypothesis", layer=0)
    keys = {p.theta_key for p in lm.planner.plan(reqs)}
    layers = list(range(len(lm.blocks)))
    lm.thetas.ensure({(layer, key) for key in keys for layer in layers})
    for layer in layers:
        alone = make_lm("gpt2", mode="hypothesis", layer=layer)
        alone.thetas.ensure({(layer, key) for key in keys})
        for key in keys:
            torch.testing.assert_close(lm.thetas.get(layer, key), alone.thetas.get(layer, key))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_regular_run_sharing_s_with_theta_equals_separate_runs(make_lm, records, arch):
    """One model evaluating regular then hypothesis then baseline (as taskvec compare does) gives each mode's
    separate outputs; regular extracts θ from the KV cache of S it generates from, and θ equals a fresh pass."""
    reqs = gen_requests()
    shared = make_lm(arch, mode="regular", layer=1, batch_size=3)
    shared.set_mode(shared.mode, shared_modes=("regular", "hypothesis", "baseline"))
    outputs = {"regular": shared.generate_until(reqs)}
    assert shared.thetas and not records  # θ ready after the regular run, nothing patched
    separate = make_lm(arch, mode="hypothesis", layer=1, batch_size=3)
    for plan in separate.plan(reqs):
        torch.testing.assert_close(
            shared.thetas.get(plan.layer, plan.theta_key),
            separate.thetas.get(plan.layer, plan.theta_key),
            rtol=1e-4,
            atol=1e-4,
        )
    for mode in ("hypothesis", "baseline"):
        shared.set_mode(mode)
        outputs[mode] = shared.generate_until(reqs)
        assert bool(shared.shared.forked_baseline) == (mode == "hypothesis")  # baseline's answers, waiting, then used
    assert outputs["regular"] == make_lm(arch, stock=True, batch_size=3).generate_until(reqs)
    assert outputs["hypothesis"] == separate.generate_until(reqs)
    assert outputs["baseline"] == make_lm(arch, mode="baseline", batch_size=3).generate_until(reqs)


def test_regular_run_prepares_theta_for_two_tasks_at_two_layers(make_lm, monkeypatch):
    reqs = gen_requests("t1") + [
        Instance("generate_until", {}, (context("xyz", q), dict(GEN)), 10 + i, ("t2", i, 1))
        for i, q in enumerate(["k", "lm", "n", "op"])
    ]
    layer_of = {"t1": 0, "t2": 2}
    shared = make_lm("gpt2", mode="regular", layer=0, batch_size=16)
    shared.set_mode(shared.mode, shared_modes=("regular", "hypothesis"))
    monkeypatch.setattr(shared, "layer_for", lambda request: layer_of[request.task_name])
    shared.generate_until(reqs)
    separate = make_lm("gpt2", mode="hypothesis", layer=0)
    monkeypatch.setattr(separate, "layer_for", lambda request: layer_of[request.task_name])
    plans = separate.plan(reqs)
    assert {p.layer for p in plans} == {0, 2}
    for plan in plans:
        torch.testing.assert_close(
            shared.thetas.get(plan.layer, plan.theta_key),
            separate.thetas.get(plan.layer, plan.theta_key),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("sliding", [False, True])
def test_regular_run_prepares_theta_of_a_row_padded_past_its_demonstrations(make_lm, monkeypatch, sliding):
    """A short prompt beside a long query with a short S: in the KV cache of the regular batch's generation,
    each row's dummies see its own S only (its query and answer masked). Under a sliding window shorter than
    that cache, the regular run leaves θ to the hypothesis run, which extracts it on its own."""
    monkeypatch.setattr(theta_module, "within_window", lambda model, width: not sliding)
    cases = [("a", "bcdefghijklmnopqrstuvw"), ("b", "c"), ("c", "d"), ("d", "ef")]
    reqs = [
        Instance("generate_until", {}, (context(d, q), dict(GEN)), i, ("t", i, 1)) for i, (d, q) in enumerate(cases)
    ]
    shared = make_lm("llama", mode="regular", layer=1, batch_size=4)
    shared.set_mode(shared.mode, shared_modes=("regular", "hypothesis"))
    shared.generate_until(reqs)
    separate = make_lm("llama", mode="hypothesis", layer=1)
    plans = separate.plan(reqs)
    assert [(p.layer, p.theta_key) in shared.thetas for p in plans] == [not sliding] * len(plans)
    shared.set_mode("hypothesis")
    shared.plan(reqs)
    for plan in plans:
        torch.testing.assert_close(
            shared.thetas.get(plan.layer, plan.theta_key),
            separate.thetas.get(plan.layer, plan.theta_key),
            rtol=1e-4,
            atol=1e-4,
        )


def test_rows_without_theta_stay_untouched_in_a_patched_batch(make_lm):
    lm = make_lm("llama", mode="hypothesis", layer=1)
    reqs = gen_requests()
    plans = lm.plan(reqs)
    mixed = [plans[0], replace(plans[1], theta_key=None)]
    ids = torch.tensor([lm.tok_encode(p.query) for p in mixed[:1]] * 2)
    base = lm._model_call(ids)
    with lm.patched(mixed, -1):
        out = lm._model_call(ids)
    torch.testing.assert_close(out[1], base[1])
    assert not torch.allclose(out[0, -1], base[0, -1], atol=1e-4)


def test_extraction_runs_no_block_past_the_deepest_layer_asked_for(make_lm):
    """θ at block L needs blocks 0..L only: the deeper blocks must never run (prefix, dummies, any batch)."""
    lm = make_lm("llama", mode="hypothesis", layer=1, batch_size=2)
    runs = [0] * len(lm.blocks)
    hooks = [
        block.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
        for i, block in enumerate(lm.blocks)
    ]
    try:
        families = [[lm.tok_encode(context(d, q)) for q in ("k", "mno")] for d in ("abcdefgh", "abc", "xy")]
        lm.thetas.last_token_states(families, [0, 1])
    finally:
        for hook in hooks:
            hook.remove()
    assert runs[0] == runs[1] > 0 and runs[2:] == [0] * (len(lm.blocks) - 2)


@pytest.mark.parametrize("cut", [1, 2])
def test_a_short_cached_prefix_continues_like_one_full_pass(make_lm, cut):
    """A KV-cached prefix (one token included, e.g. the query without its last token) then the rest of the
    prompt gives the logits of one plain forward pass."""
    lm = make_lm("llama")
    tokens = lm.tok_encode("example:abc->")
    with torch.no_grad():
        continued = prefill(lm.model, [tokens[:cut]]).extend(lm.model, [tokens[cut:]]).logits[0, -1]
        full = lm.model(torch.tensor([tokens])).logits[0, -1]
    torch.testing.assert_close(continued, full, rtol=1e-4, atol=1e-4)


def test_prefixes_mixing_empty_and_non_empty_are_refused(make_lm):
    with pytest.raises(ValueError, match="all empty or all non-empty"):
        prefill(make_lm("llama").model, [[], [5, 6]])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_grown_prefix_with_holes_continues_like_one_full_pass(make_lm, arch):
    """Prefix.grow appends rows of different lengths (one token each, then a row with none): what runs after
    it sees each row's own tokens at their own positions, as one full pass over them would."""
    lm = make_lm(arch)
    rows, one_each, ragged, tails = [[5, 6, 7], [8, 9]], [[10], [11]], [[12, 13], []], [[14, 15], [16]]
    with torch.no_grad():
        prefix = prefill(lm.model, rows, stop_block=lm.blocks[-1])
        prefix.grow(lm.model, one_each, lm.blocks[-1])
        prefix.grow(lm.model, ragged, lm.blocks[-1])
        logits = prefix.extend(lm.model, tails).logits
        for r in range(len(rows)):
            full = rows[r] + one_each[r] + ragged[r] + tails[r]
            expected = lm.model(torch.tensor([full])).logits[0, -len(tails[r]) :]
            assert torch.allclose(logits[r, : len(tails[r])], expected, atol=1e-4)


def test_the_same_context_from_two_tasks_at_two_layers_gets_each_tasks_theta(make_lm, monkeypatch):
    """Two tasks send the very same context strings (same demonstrations and queries) but patch at different
    layers: a context string cannot tell their rows apart, so each must still get its own task's plan."""

    def make(task: str):
        return [
            Instance("generate_until", {}, (context("abc", q), dict(GEN)), i, (task, i, 1))
            for i, q in enumerate(["k", "lm", "n", "op"])
        ]

    mixed_lm = make_lm("gpt2", mode="hypothesis", layer=0, batch_size=16)
    monkeypatch.setattr(mixed_lm, "layer_for", lambda request: {"t1": 0, "t2": 2}[request.task_name])
    mixed = mixed_lm.generate_until(make("t1") + make("t2"))
    alone = make_lm("gpt2", mode="hypothesis", layer=0).generate_until(make("t1"))
    alone += make_lm("gpt2", mode="hypothesis", layer=2).generate_until(make("t2"))
    assert alone[:4] != alone[4:]  # the two layers' θ do answer differently
    assert mixed == alone


def test_after_a_patched_generation_the_same_instance_generates_as_stock_hflm(make_lm):
    """Modes evaluated in turn on one instance (as the Python API allows in any order): once a hypothesis
    generation is over, nothing of its plans is left behind for regular mode's plain HFLM generation."""
    reqs = gen_requests()
    lm = make_lm("llama", mode="hypothesis", layer=1)
    lm.generate_until(reqs)
    lm.set_mode("regular")
    assert lm.generate_until(reqs) == make_lm("llama", stock=True).generate_until(reqs)


@pytest.mark.parametrize("shared", [(), ("regular", "hypothesis")])
def test_regular_generation_left_truncates_a_long_prompt_as_stock_hflm(make_lm, shared):
    """A few-shot prompt longer than max_length - max_gen_toks: regular mode cuts it from the left, as HFLM does
    (also when it prepares θ for a later hypothesis run: the full prompt then goes through the planned path)."""
    reqs = [
        Instance("generate_until", {}, (context("abcdefghijklmnop", q), dict(GEN)), i, ("t", i, 1))
        for i, q in enumerate(["k", "mn", "xyz"])
    ]
    lm = make_lm("llama", mode="regular", layer=1, max_length=24)
    lm.set_mode(lm.mode, shared_modes=shared)
    assert min(len(lm.tok_encode(r.args[0])) for r in reqs) > 24
    ours = lm.generate_until(reqs)
    assert ours == make_lm("llama", stock=True, max_length=24).generate_until(reqs)
    assert ours != make_lm("llama", stock=True).generate_until(reqs)  # the cut did change the answers


@pytest.mark.parametrize("shared", [(), ("regular", "hypothesis")])
def test_regular_generation_keeps_the_truncation_model_arg(model_factory, tokenizer, shared):
    """truncation=True (HFLM's model arg) lets the tokenizer cut prompts past its model_max_length."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from lm_eval_taskvec.model import TaskVectorLM

    short = copy.deepcopy(tokenizer)
    short.model_max_length = 12
    reqs = gen_requests()
    kwargs = dict(pretrained=model_factory("llama"), tokenizer=short, device="cpu", batch_size=4, truncation=True)
    lm = TaskVectorLM(mode="regular", layer=1, fewshot_delimiter="\n", **kwargs)
    lm.set_mode(lm.mode, shared_modes=shared)
    ours = lm.generate_until(reqs)
    assert ours == HFLM(**kwargs).generate_until(reqs)
    assert ours != HFLM(**{**kwargs, "truncation": False}).generate_until(reqs)  # the cut did change the answers


def test_baseline_answers_forked_from_several_hypothesis_batches_each_go_to_their_own_batch(make_lm, monkeypatch):
    """Hypothesis then baseline on one instance, in several batches of different widths: each baseline batch
    gets the answers forked from its own query batch, and none is left waiting."""
    monkeypatch.setattr(model_module, "MAX_BATCH_GROWTH", 1)
    reqs = gen_requests()
    shared = make_lm("llama", mode="hypothesis", layer=1, batch_size=2)
    shared.set_mode(shared.mode, shared_modes=("hypothesis", "baseline"))
    hypothesis = shared.generate_until(reqs)
    assert len(shared.shared.forked_baseline) == 3
    shared.set_mode("baseline")
    baseline = shared.generate_until(reqs)
    assert not shared.shared.forked_baseline
    assert hypothesis == make_lm("llama", mode="hypothesis", layer=1, batch_size=2).generate_until(reqs)
    assert baseline == make_lm("llama", mode="baseline", batch_size=2).generate_until(reqs)


@pytest.mark.parametrize("other", [{"max_gen_toks": 2}, {"until": ["n"]}], ids=["max_gen_toks", "until"])
def test_forked_baseline_answers_of_the_same_queries_under_other_generation_kwargs_stay_apart(make_lm, other):
    """The same query batch generated under two sets of generation kwargs (two tasks sharing their queries):
    baseline gets for each the answers forked under its own kwargs."""
    reqs = [
        Instance("generate_until", {}, (context("abc", q), dict(GEN, **kwargs)), i, ("t", i, 1))
        for i, (q, kwargs) in enumerate((q, kwargs) for kwargs in ({}, other) for q in ["k", "mn", "xyz"])
    ]
    shared = make_lm("llama", mode="hypothesis", layer=1)
    shared.set_mode(shared.mode, shared_modes=("hypothesis", "baseline"))
    shared.generate_until(reqs)
    shared.set_mode("baseline")
    baseline = shared.generate_until(reqs)
    expected = make_lm("llama", mode="baseline").generate_until(reqs)
    assert expected[:3] != expected[3:]  # the kwargs do change the answers
    assert baseline == expected


def test_regular_generation_keeps_the_tasks_sampling_kwargs(make_lm):
    """Sampling generation kwargs reach model.generate on the unpatched path as in stock HFLM."""
    sampled = {"until": ["\n"], "do_sample": True, "temperature": 2.0, "max_gen_toks": 4}
    reqs = stock_reqs = [
        Instance("generate_until", {}, (r.args[0], dict(sampled)), r.idx, r.metadata) for r in gen_requests()
    ]
    mode = "regular"
    lm, stock = make_lm("llama", mode=mode, batch_size=8), make_lm("llama", stock=True, batch_size=8)  # one batch each
    torch.manual_seed(1)
    ours = lm.generate_until(reqs)
    torch.manual_seed(1)
    assert ours == stock.generate_until(stock_reqs)
    greedy = [Instance("generate_until", {}, (r.args[0], dict(GEN)), r.idx, r.metadata) for r in stock_reqs]
    assert ours != stock.generate_until(greedy)  # sampling did change the answers


@pytest.mark.parametrize("shared", [("hypothesis",), ("hypothesis", "baseline")])
def test_one_token_queries_generate_with_or_without_a_forked_baseline(make_lm, shared):
    """Queries of one token leave no column to prefill before the patched one: hypothesis generates them
    directly (nothing forked for baseline), with the same answers as a plain hypothesis run."""
    reqs = [
        Instance("generate_until", {}, (context("abc", "x").rsplit("\n", 1)[0] + "\n" + q, dict(GEN)), i, ("t", i, 1))
        for i, q in enumerate("kmnp")
    ]
    lm = make_lm("llama", mode="hypothesis", layer=1)
    assert all(len(lm.tok_encode(p.query)) == 1 for p in lm.plan(reqs))
    lm.set_mode(lm.mode, shared_modes=shared)
    outputs = lm.generate_until(reqs)
    assert not lm.shared.forked_baseline
    assert outputs == make_lm("llama", mode="hypothesis", layer=1).generate_until(reqs)


def test_hypothesis_and_its_forked_baseline_answers_are_sampled_when_the_task_samples(make_lm):
    """A hypothesis run and the baseline answers forked in it get the task's sampling kwargs (seeded: not greedy)."""
    sampled = {"until": ["\n"], "do_sample": True, "temperature": 2.0, "max_gen_toks": 4}
    reqs = [Instance("generate_until", {}, (r.args[0], dict(sampled)), r.idx, r.metadata) for r in gen_requests()]
    shared = make_lm("llama", mode="hypothesis", layer=1, batch_size=8)
    shared.set_mode(shared.mode, shared_modes=("hypothesis", "baseline"))
    greedy = [Instance("generate_until", {}, (r.args[0], dict(GEN)), r.idx, r.metadata) for r in reqs]
    torch.manual_seed(1)
    assert shared.generate_until(reqs) != make_lm("llama", mode="hypothesis", layer=1, batch_size=8).generate_until(
        greedy
    )
    shared.set_mode("baseline")
    assert shared.generate_until(reqs) != make_lm("llama", mode="baseline", batch_size=8).generate_until(greedy)


def test_sliding_window_is_read_from_the_config():
    def config(cls, **kwargs):
        return SimpleNamespace(config=cls(**kwargs))

    assert extraction.within_window(config(transformers.MistralConfig, sliding_window=16), 16)
    assert not extraction.within_window(config(transformers.MistralConfig, sliding_window=16), 17)
    assert extraction.within_window(config(transformers.MistralConfig, sliding_window=None), 10**6)
    assert extraction.within_window(
        config(transformers.Qwen2Config, use_sliding_window=False, sliding_window=16), 10**6
    )
    assert extraction.within_window(config(transformers.LlamaConfig), 10**6)
