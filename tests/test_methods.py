"""Hypothesis mode's methods (hendel, elicit, task_mean) and their parts (vector, op, scale), on tiny models.

Expected values come from a run without ``method=`` (Hendel's path as it was), baseline runs, and θ written
out by hand from ``output_hidden_states``."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

import lm_eval_taskvec.model as model_module
from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.layers import Intervention, intervene
from lm_eval_taskvec.selection import cache, sweep, task_mean_key
from lm_eval_taskvec.selection.dev import dev_sets
from lm_eval_taskvec.settings import Settings
from tests.helpers import ARCHITECTURES, gen_requests, ll_requests, run_task
from tests.tasks import requests_of


@pytest.fixture
def layer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "fresh"))
    return tmp_path / "fresh" / "layers"


def one_token(requests):
    """The requests with one generated token and no stop string: the first token is all a patch decides."""
    gen = {"until": [], "do_sample": False, "max_gen_toks": 1}
    return [Instance("generate_until", {}, (r.args[0], dict(gen)), r.idx, r.metadata) for r in requests]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_hendel_equals_a_run_without_method_document_by_document(make_lm, arch):
    plain = make_lm(arch, mode="hypothesis", layer=1)
    named = make_lm(arch, mode="hypothesis", layer=1, method="hendel")
    parts = make_lm(arch, mode="hypothesis", layer=1, vector="prompt", op="replace", scale=1.0)
    expected = (plain.generate_until(gen_requests()), plain.loglikelihood(ll_requests()))
    for lm in (named, parts):
        assert (lm.generate_until(gen_requests()), lm.loglikelihood(ll_requests())) == expected


def test_hendel_keeps_the_layer_cache_key_and_answer_settings_other_methods_change_them(make_lm, layer_cache):
    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)  # loads the task
    sets = dev_sets(Settings(num_dev=6), "tv_list_first")

    def key(**kwargs):
        lm = make_lm("llama", mode="hypothesis", num_dev=6, **kwargs)
        return cache.cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, "tv_list_first", sets), lm

    default, lm = key()
    assert key(method="hendel")[0] == default
    assert "vector" not in lm.answer_settings()  # --use_cache databases of Hendel's runs keep their mark
    others = {key(method=m)[0] for m in ("elicit", "task_mean")} | {key(op="add")[0], key(method="elicit", scale=3)[0]}
    assert default not in others and len(others) == 4
    assert key(op="add", scale=2)[0] == key(method="elicit")[0]  # the same parts: the same sweep


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_add_at_scale_zero_equals_baseline_exactly(make_lm, monkeypatch, arch):
    monkeypatch.setattr(model_module, "MAX_BATCH_GROWTH", 1)  # the same batches in both modes
    base = make_lm(arch, mode="baseline", batch_size=1)
    added = make_lm(arch, mode="hypothesis", layer=1, op="add", scale=0, batch_size=1)
    assert added.generate_until(gen_requests()) == base.generate_until(gen_requests())
    assert added.loglikelihood(ll_requests()) == base.loglikelihood(ll_requests())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_add_writes_h_plus_scale_theta_at_the_given_position_of_its_row_only(make_lm, arch):
    lm = make_lm(arch, mode="hypothesis", layer=1)
    inps = torch.tensor([lm.tok_encode("example:abc->"), lm.tok_encode("example:xyz->")])
    with torch.no_grad():
        plain = lm.model(inps, output_hidden_states=True)
    vector, seen = torch.randn(lm.model.config.hidden_size), {}
    with torch.no_grad(), intervene(lm.blocks, [Intervention(vector, 1, "add", 0.5), None], torch.tensor([3, 3])):
        hook = lm.blocks[1].register_forward_hook(  # after the patch's hook: sees what it wrote
            lambda m, a, out: seen.update(h=(out if isinstance(out, torch.Tensor) else out[0]).clone())
        )
        try:
            patched = lm.model(inps).logits
        finally:
            hook.remove()
    block_out = plain.hidden_states[2]
    expected = block_out.clone()
    expected[0, 3] += 0.5 * vector
    torch.testing.assert_close(seen["h"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched[0, :3], plain.logits[0, :3])  # causal: earlier positions untouched
    torch.testing.assert_close(patched[1], plain.logits[1])  # the other row untouched
    assert not torch.allclose(patched[0, 3], plain.logits[0, 3], atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_elicit_generates_from_h_plus_two_theta_at_the_prompts_last_token_only(make_lm, arch):
    """The first generated token is the argmax of a forward pass of the query alone with block 1's output at its
    last token shifted by 2·θ (θ from hidden_states, the shift by a hook written here); decode steps unpatched."""
    lm = make_lm(arch, mode="hypothesis", layer=1, method="elicit")
    assert lm.settings.parts == ("prompt", "add", 2.0)
    reqs = one_token(gen_requests())
    answers = lm.generate_until(reqs)
    differs = []
    for plan, answer in zip(lm.plan(reqs), answers):
        theta = torch.stack(
            [
                lm.model(torch.tensor([lm.tok_encode(plan.theta_key.demos + d)]), output_hidden_states=True)
                .hidden_states[2][0, -1]
                .detach()
                for d in plan.theta_key.dummies
            ]
        ).mean(0)

        def shift(module, args, output, theta=theta):
            hidden = (output if isinstance(output, torch.Tensor) else output[0]).clone()
            hidden[:, -1] += 2 * theta
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        query = torch.tensor([lm.tok_encode(plan.query)])
        handle = lm.blocks[1].register_forward_hook(shift)
        try:
            with torch.no_grad():
                token = lm.model(query).logits[0, -1].argmax().item()
        finally:
            handle.remove()
        assert answer == lm.tok_decode([token])
        with torch.no_grad():
            differs.append(token != lm.model(query).logits[0, -1].argmax().item())
    assert any(differs)  # the shift changes some first tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_task_mean_theta_is_the_mean_over_dev_prompts_of_hand_computed_theta(make_lm, layer_cache, arch):
    lm = make_lm(arch, mode="hypothesis", layer=1, method="task_mean", num_dev=6)
    out = run_task(lm, limit=2)
    assert out["config"]["taskvec"]["method"] == "task_mean"
    key = task_mean_key(lm, "tv_list_first")
    contexts = {r.args[0] for dev in dev_sets(lm.settings, "tv_list_first") for ex in dev.examples for r in ex.requests}
    assert len(key.mean_of) == len(contexts) > 1  # one θ per dev prompt
    per_set = []
    for member in key.mean_of:
        states = [
            lm.model(torch.tensor([lm.tok_encode(member.demos + d)]), output_hidden_states=True)
            .hidden_states[2][0, -1]
            .detach()
            for d in member.dummies
        ]
        per_set.append(torch.stack(states).mean(0))
    torch.testing.assert_close(lm.thetas.get(1, key), torch.stack(per_set).mean(0), rtol=1e-4, atol=1e-4)
    plans = lm.plan(requests_of(LOADED_TASKS["tv_list_first"], limit=2))
    assert {p.theta_key for p in plans} == {key}  # every document patched with the task's one θ


def test_task_mean_with_layer_auto_sweeps_its_own_choice(make_lm, layer_cache):
    hendel = run_task(make_lm("llama", mode="hypothesis", num_dev=6), limit=2)["config"]["taskvec"]
    mean = run_task(make_lm("llama", mode="hypothesis", num_dev=6, method="task_mean"), limit=2)["config"]["taskvec"]
    assert mean["layer_selection"]["tv_list_first"]["source"] == "sweep"  # not Hendel's cached choice
    assert len(list(layer_cache.glob("*.json"))) == 2
    for field in ("baseline_accuracy", "regular_accuracy", "dev_docs"):  # the same dev prompts and references
        assert mean["layer_selection"]["tv_list_first"][field] == hendel["layer_selection"]["tv_list_first"][field]


@pytest.mark.parametrize("method", ["elicit", "task_mean", "function_vector"])
def test_a_second_methods_sweep_reuses_regular_and_theta_and_chooses_as_a_fresh_model_does(
    make_lm, layer_cache, monkeypatch, method
):
    """One model sweeping Hendel's θ, then another method's (taskvec compare --methods): the second sweep runs
    neither the dev prompts' regular pass nor their demonstrations again, and its choice and answers are those
    of a fresh model that swept that method alone."""
    calls = []
    real = sweep.regular_and_thetas
    monkeypatch.setattr(sweep, "regular_and_thetas", lambda *args: calls.append(1) or real(*args))
    lm = make_lm("llama", mode="hypothesis", num_dev=6, top_heads=2, layer_cache="off")
    run_task(lm, limit=3)
    lm.set_method(method)
    shared = run_task(lm, limit=3)
    assert len(calls) == 1
    fresh = run_task(
        make_lm("llama", mode="hypothesis", num_dev=6, top_heads=2, method=method, layer_cache="off"), limit=3
    )
    assert len(calls) == 2
    assert shared["config"]["taskvec"]["layer_selection"] == fresh["config"]["taskvec"]["layer_selection"]
    assert shared["results"] == fresh["results"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"method": "steering"}, "method='steering' is unknown: use one of hendel, elicit, task_mean"),
        ({"op": "multiply"}, "op='multiply' is unknown: use one of replace, add"),
        ({"vector": "pca"}, "vector='pca' is unknown: use one of prompt, task_mean"),
        ({"scale": 2.0}, "scale=2 with op=replace"),
        ({"method": "task_mean", "scale": 3}, "use op=add"),
        ({"op": "add", "scale": "big"}, "scale='big' must be a finite number"),
        ({"op": "add", "scale": float("inf")}, "must be a finite number"),
    ],
)
def test_bad_method_arguments_are_refused_naming_the_valid_ones(args, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("+", r"\+")):
        Settings.read(**args)


def test_task_mean_refuses_a_stored_theta_and_an_unloaded_task(make_lm, tmp_path):
    with pytest.raises(ValueError, match="theta_path="):
        make_lm("llama", mode="hypothesis", method="task_mean", theta_path=str(tmp_path / "none.safetensors"))
    lm = make_lm("llama", mode="hypothesis", layer=1, method="task_mean")
    with pytest.raises(ValueError, match="vector=task_mean averages θ over dev prompts of task 't'"):
        lm.generate_until(gen_requests())
