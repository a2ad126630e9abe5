"""Function vectors (method=function_vector) on tiny models of every architecture.

Expected values are computed here: head outputs from hooks written in the test on the attention output
projection (its input, its output), head means and indirect effects from full forward passes without a KV
cache, the function vector from the projection's weight sliced by hand, and the patched generation by greedy
decoding with a hand-written hook."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.heads import find_attention_outputs, read_heads
from lm_eval_taskvec.selection import function_vector as fv
from lm_eval_taskvec.selection import function_vector_of
from lm_eval_taskvec.selection.dev import dev_sets
from lm_eval_taskvec.theta import shuffled_label_contexts
from tests.helpers import ARCHITECTURES, run_task
from tests.tasks import letter_rows, make_task, requests_of

TASK = "tv_list_first"
PROJECTION = {  # where each architecture keeps its attention output projection, relative to a block
    "gpt2": "attn.c_proj",
    "gptj": "attn.out_proj",
    "gpt_neox": "attention.dense",
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "gemma": "self_attn.o_proj",
}


@pytest.fixture
def layer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "fresh"))
    return tmp_path / "fresh" / "layers"


def head_slice(proj: nn.Module, head: int, d: int) -> torch.Tensor:
    """W_h [hidden, head_dim], by hand: GPT-2's Conv1D computes x @ W (W: [in, out]), the others x @ W^T."""
    if type(proj).__name__ == "Conv1D":
        return proj.weight[head * d : (head + 1) * d, :].T
    return proj.weight[:, head * d : (head + 1) * d]


def shape(model) -> tuple[int, int]:
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return heads, getattr(config, "head_dim", None) or hidden // heads


@pytest.fixture
def captured():
    """Hooks written here on modules: each records its module's (input, output) at every call."""
    handles, seen = [], {}

    def capture(name, module):
        def hook(m, args, output):
            seen.setdefault(name, []).append((args[0].detach().clone(), output.detach().clone()))

        handles.append(module.register_forward_hook(hook))
        return seen

    yield capture
    for handle in handles:
        handle.remove()


def clean_prompts(lm) -> list[list[int]]:
    examples = [ex for dev in dev_sets(lm.settings, TASK) for ex in dev.examples]
    return [lm.tok_encode(ex.requests[0].args[0]) for ex in examples]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_outputs_are_the_projections_input_and_sum_back_to_its_output(make_lm, captured, arch):
    lm = make_lm(arch, mode="hypothesis", layer=1)
    outputs = find_attention_outputs(lm.model, lm.blocks)
    heads, d = shape(lm.model)
    assert (outputs.num_heads, outputs.head_dim) == (heads, d)
    for block, proj in zip(lm.blocks, outputs.projections):
        assert block.get_submodule(PROJECTION[arch]) is proj
    for i, proj in enumerate(outputs.projections):
        seen = captured(i, proj)
    ids = torch.tensor([lm.tok_encode("example:abc->ABC\nexample:de->")])
    with torch.no_grad(), read_heads(outputs) as found:
        lm.model(ids)
    for layer, proj in enumerate(outputs.projections):
        ((given, produced),) = seen[layer]
        assert torch.equal(found[layer][0], given[0, -1].view(heads, d))
        summed = sum(given[0, -1, h * d : (h + 1) * d] @ head_slice(proj, h, d).T for h in range(heads))
        bias = proj.bias if proj.bias is not None else 0
        torch.testing.assert_close(summed, produced[0, -1] - bias, rtol=1e-5, atol=1e-5)


def hand_effects(lm, outputs, means, rows) -> torch.Tensor:
    """AIE by full forward passes of each whole prompt (no cache), one head patched by a hook written here."""
    heads, d = outputs.num_heads, outputs.head_dim
    effects = torch.zeros(len(lm.blocks), heads)
    for tokens, target in rows:
        ids = torch.tensor([tokens])
        with torch.no_grad():
            base = lm.model(ids).logits[0, -1].softmax(-1)[target]
        for layer, proj in enumerate(outputs.projections):
            for h in range(heads):

                def patch(module, args, h=h, layer=layer):
                    x = args[0].clone()
                    x[0, -1, h * d : (h + 1) * d] = means[layer][h]
                    return (x, *args[1:])

                handle = proj.register_forward_pre_hook(patch)
                try:
                    with torch.no_grad():
                        effects[layer, h] += lm.model(ids).logits[0, -1].softmax(-1)[target] - base
                finally:
                    handle.remove()
    return effects / len(rows)


@pytest.mark.parametrize(("arch", "columns"), [(arch, True) for arch in ARCHITECTURES] + [("llama", False)])
def test_kv_cached_head_trials_equal_full_passes_with_the_head_patched_by_hand(make_lm, monkeypatch, arch, columns):
    """Heads run as columns of one row under a 4D mask, or (a model that takes none) a pass per head."""
    if not columns:
        monkeypatch.setattr(fv, "branch_mask_kind", lambda model: None)
    lm = make_lm(arch, mode="hypothesis", layer=1, batch_size=2)  # two groups: one of two prompts, one of one
    outputs = find_attention_outputs(lm.model, lm.blocks)
    torch.manual_seed(1)
    means = [torch.randn(outputs.num_heads, outputs.head_dim) for _ in lm.blocks]
    texts = ["example:abc->ABC\nexample:de->", "example:q->Q\nexample:rs->RS\nexample:t->", "example:x->"]
    rows = [(lm.tok_encode(t), lm.tok_encode("A", add_special_tokens=False)[0]) for t in texts]  # lengths differ
    expected = hand_effects(lm, outputs, means, rows)
    torch.testing.assert_close(fv.indirect_effects(lm, outputs, means, rows), expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-4  # the patches change something


def test_head_means_are_the_mean_of_the_projections_input_at_each_prompts_last_token(make_lm, captured, layer_cache):
    lm = make_lm("qwen2", mode="hypothesis", layer=1, batch_size=2)
    run_task(lm, limit=1)  # loads the task
    lm = make_lm("qwen2", mode="hypothesis", layer=1, num_dev=6, batch_size=2)
    outputs = find_attention_outputs(lm.model, lm.blocks)
    prompts = clean_prompts(lm)
    means = fv.mean_head_outputs(lm, outputs, prompts)  # batched, left-padded
    seen = captured("last", outputs.projections[2])
    for tokens in prompts:
        with torch.no_grad():
            lm.model(torch.tensor([tokens]))
    by_hand = torch.stack([given[0, -1] for given, _ in seen["last"]]).mean(0).view_as(means[2])
    torch.testing.assert_close(means[2], by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "counts"),
    [("gpt2", {}), ("llama", {}), ("gpt_neox", {}), ("llama", {"num_mean_prompts": 2, "num_aie_prompts": 4})],
)
def test_function_vector_is_the_sum_of_the_top_heads_mean_outputs_through_their_projection_slice(
    make_lm, layer_cache, arch, counts
):
    """Means over the first num_mean_prompts clean dev prompts, AIE over the first num_aie_prompts shuffled."""
    lm = make_lm(arch, mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=3, **counts)
    out = run_task(lm, limit=2)
    record = out["config"]["taskvec"]["function_vector"][TASK]
    assert out["config"]["taskvec"]["method"] == "function_vector" and out["config"]["taskvec"]["op"] == "add"
    top = record["top_heads"]
    assert len(top) == 3 and [t["aie"] for t in top] == sorted((t["aie"] for t in top), reverse=True)
    num_mean, num_aie = counts.get("num_mean_prompts", 6), counts.get("num_aie_prompts", 6)
    assert (record["num_prompts"], record["num_mean_prompts"], record["num_aie_prompts"]) == (6, num_mean, num_aie)
    outputs = find_attention_outputs(lm.model, lm.blocks)
    heads, d = shape(lm.model)
    states = {}
    for tokens in clean_prompts(lm)[:num_mean]:  # one prompt at a time, no padding
        seen = []
        handles = [
            p.register_forward_pre_hook(lambda m, a, i=i, seen=seen: seen.append((i, a[0][0, -1].detach().clone())))
            for i, p in enumerate(outputs.projections)
        ]
        try:
            with torch.no_grad():
                lm.model(torch.tensor([tokens]))
        finally:
            for h in handles:
                h.remove()
        for i, value in seen:
            states.setdefault(i, []).append(value)
    means = {i: torch.stack(v).mean(0).view(heads, d) for i, v in states.items()}
    expected = sum(
        head_slice(outputs.projections[t["layer"]], t["head"], d) @ means[t["layer"]][t["head"]] for t in top
    )
    key, _ = function_vector_of(lm, TASK)
    for layer in range(len(lm.blocks)):  # one vector per task, at every block
        torch.testing.assert_close(lm.thetas.get(layer, key), expected.detach(), rtol=1e-4, atol=1e-5)
    # the record's AIE agree with full passes over the shuffled-label prompts
    task = LOADED_TASKS[TASK]
    examples = [ex for dev in dev_sets(lm.settings, TASK) for ex in dev.examples]
    pairs = shuffled_label_contexts(task, [(ex.doc_id, ex.doc) for ex in examples], 5, lm.settings.seed)
    rows = [
        (lm.tok_encode(s), lm.tok_encode(ex.gold, add_special_tokens=False)[0]) for (_, s), ex in zip(pairs, examples)
    ][:num_aie]
    effects = hand_effects(lm, outputs, [means[i] for i in range(len(lm.blocks))], rows)
    for t in top:
        assert t["aie"] == pytest.approx(effects[t["layer"], t["head"]].item(), abs=1e-5)
    best = effects.flatten().argmax().item()
    assert (top[0]["layer"], top[0]["head"]) == divmod(best, heads)


def test_shuffled_label_prompts_keep_the_demonstrations_queries_and_permute_their_answers(make_lm, layer_cache):
    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)
    task = LOADED_TASKS[TASK]
    examples = [ex for dev in dev_sets(make_lm("llama", num_dev=6).settings, TASK) for ex in dev.examples]
    pairs = shuffled_label_contexts(task, [(ex.doc_id, ex.doc) for ex in examples], 5, 1234)
    changed = 0
    for (clean, shuffled), ex in zip(pairs, examples):
        assert clean == ex.requests[0].args[0]  # the dev prompt itself
        lines, twins = clean.split("\n"), shuffled.split("\n")
        assert lines[-1] == twins[-1] and len(lines) == len(twins) == 6  # 5 demonstrations, the same query
        demos = [line.split("->") for line in lines[:-1]]
        shuffled_demos = [line.split("->") for line in twins[:-1]]
        assert [q for q, _ in demos] == [q for q, _ in shuffled_demos]
        assert sorted(a for _, a in demos) == sorted(a for _, a in shuffled_demos)
        changed += demos != shuffled_demos
    assert changed > 0
    assert shuffled_label_contexts(task, [(ex.doc_id, ex.doc) for ex in examples], 5, 1234) == pairs  # seeded


def test_a_head_whose_projection_slice_is_zero_has_no_effect_and_is_never_chosen(make_lm, model_factory, layer_cache):
    lm = make_lm("llama", mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=1)
    best = run_task(lm, limit=1)["config"]["taskvec"]["function_vector"][TASK]["top_heads"][0]
    assert best["aie"] > 0
    model = copy.deepcopy(model_factory("llama"))
    outputs = find_attention_outputs(model, model.model.layers)
    d = outputs.head_dim
    with torch.no_grad():
        outputs.projections[best["layer"]].weight[:, best["head"] * d : (best["head"] + 1) * d] = 0
    edited = make_lm(pretrained=model, mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=1)
    chosen = run_task(edited, limit=1)["config"]["taskvec"]["function_vector"][TASK]["top_heads"][0]
    assert (chosen["layer"], chosen["head"]) != (best["layer"], best["head"])
    rows = [(tokens, tokens[-1]) for tokens in clean_prompts(edited)]
    means = fv.mean_head_outputs(edited, outputs, clean_prompts(edited))
    effects = fv.indirect_effects(edited, outputs, means, rows)
    assert abs(effects[best["layer"], best["head"]].item()) < 1e-7 < effects.abs().max().item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_function_vector_generates_from_h_plus_fv_at_the_prompts_last_token_only(make_lm, layer_cache, arch):
    """Each answer is greedy decoding by hand: full passes of query + generated tokens with the FV added to
    block 1's output at the query's last position (so the prompt's pass only), by a hook written here."""
    lm = make_lm(arch, mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=2)
    run_task(lm, limit=1)
    requests = requests_of(LOADED_TASKS[TASK], limit=3)
    for r in requests:
        r.args[1].update(until=[], max_gen_toks=3)
    answers = lm.generate_until(requests)
    key, _ = function_vector_of(lm, TASK)
    vector = lm.thetas.get(1, key)
    for plan, answer in zip(lm.plan(requests), answers):
        ids = lm.tok_encode(plan.query)
        at = len(ids) - 1

        def add(module, args, output, at=at):
            hidden = (output if isinstance(output, torch.Tensor) else output[0]).clone()
            hidden[0, at] += vector
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        handle = lm.blocks[1].register_forward_hook(add)
        try:
            for _ in range(3):
                with torch.no_grad():
                    ids = ids + [int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())]
        finally:
            handle.remove()
        assert answer == lm.tok_decode(ids[at + 1 :])


def test_the_ranking_and_vector_are_cached_and_a_bad_file_is_computed_again(make_lm, layer_cache):
    first = run_task(make_lm("gpt2", mode="hypothesis", layer=1, method="function_vector", num_dev=6), limit=1)
    record = first["config"]["taskvec"]["function_vector"][TASK]
    assert record["source"] == "sweep" and len(record["top_heads"]) == 10
    again = make_lm("gpt2", mode="hypothesis", layer=1, method="function_vector", num_dev=6)
    second = run_task(again, limit=1)["config"]["taskvec"]["function_vector"][TASK]
    assert second["source"].startswith(str(layer_cache)) and second["top_heads"] == record["top_heads"]
    path = layer_cache / second["source"].rsplit("/", 1)[1]
    stored = json.loads(path.read_text())
    assert stored["top_heads"] == record["top_heads"]
    path.write_text(json.dumps(stored | {"vector": stored["vector"][:-1]}))  # not a vector of this model
    third = make_lm("gpt2", mode="hypothesis", layer=1, method="function_vector", num_dev=6)
    assert run_task(third, limit=1)["config"]["taskvec"]["function_vector"][TASK]["source"] == "sweep"
    for changed in ({"top_heads": 2}, {"num_aie_prompts": 3}):
        other = make_lm("gpt2", mode="hypothesis", layer=1, method="function_vector", num_dev=6, **changed)
        assert run_task(other, limit=1)["config"]["taskvec"]["function_vector"][TASK]["source"] == "sweep"


def test_function_vector_with_layer_auto_sweeps_its_own_choice(make_lm, layer_cache):
    out = run_task(make_lm("llama", mode="hypothesis", method="function_vector", num_dev=6, top_heads=2), limit=2)
    taskvec = out["config"]["taskvec"]
    assert taskvec["layer_selection"][TASK]["source"] == "sweep" and taskvec["function_vector"][TASK]["top_heads"]
    again = run_task(make_lm("llama", mode="hypothesis", method="function_vector", num_dev=6, top_heads=2), limit=2)
    assert again["config"]["taskvec"]["layer_selection"][TASK]["source"] != "sweep"  # read back
    assert again["results"] == out["results"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"top_heads": 13}, "top_heads=13 is more than the 12 attention heads"),
        ({"top_heads": 0}, "top_heads=0 must be an integer >= 1"),
        ({"top_heads": -2.0}, "top_heads=-2.0 must be an integer >= 1"),
        ({"attn_out_path": "self_attn.q"}, "attn_out_path='self_attn.q' names no submodule of block 0"),
        ({"attn_out_path": "mlp.down_proj"}, "attn_out_path='mlp.down_proj' is a Linear, not a linear layer from"),
        ({"num_aie_prompts": 0}, "num_aie_prompts=0 must be an integer >= 1"),
        ({"num_mean_prompts": 2, "method": "hendel"}, "num_mean_prompts=2 counts the prompts of a function vector"),
    ],
)
def test_bad_function_vector_arguments_are_refused_naming_them(make_lm, args, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        make_lm("llama", **{"mode": "hypothesis", "method": "function_vector"} | args)


def test_more_function_vector_prompts_than_dev_prompts_are_refused_naming_both(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", layer=1, method="function_vector", num_dev=6, num_mean_prompts=7)
    with pytest.raises(ValueError, match=r"num_mean_prompts=7 is more than the 6 dev prompts of task 'tv_list_first'"):
        run_task(lm, limit=1)


class Projection(nn.Module):
    """An attention output projection that is not an nn.Linear: discovery cannot tell it from other modules."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_a_projection_that_is_not_found_is_refused_naming_attn_out_path_which_then_works(
    make_lm, model_factory, layer_cache
):
    plain = make_lm("llama", mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=2)
    expected = run_task(plain, limit=2)
    model = copy.deepcopy(model_factory("llama"))
    for block in model.model.layers:
        block.self_attn.o_proj = Projection(block.self_attn.o_proj)
    with pytest.raises(ValueError, match=r"attention output projection of LlamaDecoderLayer .* attn_out_path="):
        make_lm(pretrained=model, mode="hypothesis", layer=1, method="function_vector")
    named = make_lm(
        pretrained=model, mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=2,
        attn_out_path="self_attn.o_proj",
    )  # fmt: skip
    got = run_task(named, limit=2)
    for field in ("top_heads", "num_prompts"):
        assert (
            got["config"]["taskvec"]["function_vector"][TASK][field]
            == (expected["config"]["taskvec"]["function_vector"][TASK][field])
        )
    assert got["results"] == expected["results"]


def test_export_refuses_a_num_fewshot_other_than_the_function_vectors_own(make_lm, layer_cache, tmp_path):
    from lm_eval_taskvec.analyses import export

    run_task(make_lm("llama", mode="hypothesis", layer=1), limit=1)  # loads the task
    lm = make_lm("llama", mode="hypothesis", layer=1, num_dev=6)
    with pytest.raises(ValueError, match="--num_fewshot 3: task 'tv_list_first'.s function vector .* own 5"):
        export.export_thetas(
            lm, {TASK: LOADED_TASKS[TASK]}, tmp_path, layers=["1"], num_fewshot=3, method="function_vector"
        )


def test_multiple_choice_shuffles_answer_texts_and_ranks_heads_by_the_right_choices_first_token(make_lm, layer_cache):
    """A cross-fitted multiple-choice task whose target is an index (always 0, into choices of its own): the
    shuffled prompts permute the demonstrations' answer texts; AIE are those of full passes by hand, at the
    first token of the right choice's continuation after the context (as lm-eval encodes the pair)."""
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
    requests = requests_of(task, limit=3)
    lm = make_lm("llama", mode="hypothesis", layer=1, method="function_vector", num_dev=6, top_heads=3)
    sets = dev_sets(lm.settings, "tiny")
    assert len(sets) == 2  # cross-fitted: both halves' prompts
    examples = [ex for dev in sets for ex in dev.examples]
    pairs = [
        p for dev in sets for p in shuffled_label_contexts(task, [(e.doc_id, e.doc) for e in dev.examples], 3, 1234)
    ]
    changed = 0
    for (clean, shuffled), ex in zip(pairs, examples):
        assert clean == ex.requests[0].args[0]
        lines, twins = clean.split("\n"), shuffled.split("\n")
        assert lines[0::2] == twins[0::2] and sorted(lines[1:-1:2]) == sorted(twins[1:-1:2]) and twins[-1] == "A:"
        changed += lines != twins
    assert changed > 0
    key, record = function_vector_of(lm, "tiny")
    assert record["num_prompts"] == 12 and len(record["top_heads"]) == 3
    outputs = find_attention_outputs(lm.model, lm.blocks)
    right = [ex.requests[ex.gold].args[1] for ex in examples]
    means = fv.mean_head_outputs(lm, outputs, [lm.encode_pair(c, r)[0] for (c, _), r in zip(pairs, right)])
    rows = [(lm.encode_pair(s, r)[0], lm.encode_pair(s, r)[1][0]) for (_, s), r in zip(pairs, right)]
    effects = hand_effects(lm, outputs, means, rows)
    for t in record["top_heads"]:
        assert t["aie"] == pytest.approx(effects[t["layer"], t["head"]].item(), abs=1e-5)
    assert len(lm.loglikelihood(requests)) == len(requests)  # patched runs
