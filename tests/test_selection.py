"""layer=auto: a sweep over every block on the validation split, cached on disk, visible in the results."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from lm_eval_taskvec import selection
from lm_eval_taskvec.tasks import task_dir


@pytest.fixture
def layer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))
    return tmp_path / "layers"


def run(lm, task="tv_list_first", limit=4):
    tasks = TaskManager(include_path=str(task_dir()), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[task], task_manager=tasks, limit=limit)


def test_auto_sweeps_every_block_on_validation_and_reports_the_curve(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", num_dev=6)
    out = run(lm)
    chosen = out["config"]["taskvec"]["layer_selection"]["tv_list_first"]
    curve = chosen["dev_accuracy"]
    assert len(curve) == len(lm.blocks) and chosen["source"] == "sweep" and chosen["num_dev"] == 6
    assert chosen["layer"] == max(range(len(curve)), key=lambda i: (curve[i], -i))  # ties -> lowest
    assert len(list(layer_cache.glob("*.json"))) == 1


def test_dev_prompts_come_from_validation_never_test(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", num_dev=10)
    run(lm)  # loads the task object the sweep reads
    data = [json.loads(line) for line in (task_dir() / "data" / "tv_list_first.jsonl").read_text().splitlines()]
    split_of = {row["input"]: row["split"] for row in data}
    dev = selection.dev_examples(lm, "tv_list_first")
    queries = [ex.context.rpartition("\n")[2].removeprefix("example:").removesuffix("->") for ex in dev]
    assert len(queries) == 10 and all(split_of[q] == "validation" for q in queries)


def test_rerun_reuses_the_cached_choice_and_a_changed_model_does_not(make_lm, model_factory, layer_cache):
    first = run(make_lm("llama", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    again = run(make_lm("llama", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    assert again["tv_list_first"]["source"].endswith(".json")
    assert again["tv_list_first"]["dev_accuracy"] == first["tv_list_first"]["dev_accuracy"]
    other = run(make_lm("qwen2", mode="hypothesis", num_dev=6))["config"]["taskvec"]["layer_selection"]
    assert other["tv_list_first"]["source"] == "sweep"
    assert len(list(layer_cache.glob("*.json"))) == 2


def test_sweep_curve_matches_single_layer_hypothesis_runs(make_lm, layer_cache):
    """The sweep's batched scoring equals scoring each block on its own through the normal patched path."""
    lm = make_lm("gpt2", mode="hypothesis", num_dev=6)
    run(lm, limit=3)
    dev = selection.dev_examples(lm, "tv_list_first")
    curve = selection.sweep(lm, "tv_list_first", dev)
    for layer in range(len(lm.blocks)):
        fixed = make_lm("gpt2", mode="hypothesis", layer=layer)
        reqs = [selection.Instance("generate_until", {}, (ex.context, {"until": ["\n"], "max_gen_toks": 1,
                                   "do_sample": False}), i, ("tv_list_first", i, 1)) for i, ex in enumerate(dev)]
        firsts = fixed.generate_until(reqs)
        hits = [fixed.tok_encode(ex.choices[0])[0] == fixed.tok_encode(g)[0] if g else False
                for ex, g in zip(dev, firsts)]
        assert curve[layer] == pytest.approx(sum(hits) / len(dev))


def test_dummies_come_from_all_the_tasks_documents_not_only_the_limited_ones(make_lm, layer_cache):
    lm = make_lm("llama", mode="hypothesis", layer=1)
    one = run(lm, limit=1)  # a single document still finds dummies among the task's other documents
    assert one["results"]["tv_list_first"]["exact_match,none"] in (0.0, 1.0)
    reqs = _requests(lm, 6)
    assert lm.plan(reqs[:1])[0] == lm.plan(reqs)[0]  # θ of a document does not depend on --limit


def _requests(lm, limit):
    from lm_eval_taskvec._autoload import LOADED_TASKS

    task = LOADED_TASKS["tv_list_first"]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def test_multiple_choice_sweep_matches_fixed_layer_scoring(make_lm, layer_cache, tmp_path):
    """For a loglikelihood task, each block's dev accuracy is the argmax over its choices' log-probabilities."""
    rows = [{"q": f"{a} {b}", "choices": [a, b, "c"], "label": i % 2}
            for i, (a, b) in enumerate(zip("abcdefghijkl", "mnopqrstuvwx"))]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "task: tiny_mc_dev\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {tmp_path / 'mc.jsonl'}\n"
        "training_split: train\nvalidation_split: train\ntest_split: train\nnum_fewshot: 2\n"
        "output_type: multiple_choice\ndoc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    TaskManager(include_path=str(tmp_path), include_defaults=False).load(["tiny_mc_dev"])
    lm = make_lm("gpt2", mode="hypothesis", num_dev=6)
    dev = selection.dev_examples(lm, "tiny_mc_dev")
    assert all(len(ex.choices) == 3 for ex in dev)
    curve = selection.sweep(lm, "tiny_mc_dev", dev)
    requests = [selection.Instance("loglikelihood", {}, (ex.context, c), i, ("tiny_mc_dev", i, 1))
                for i, ex in enumerate(dev) for c in ex.choices]
    for layer in range(len(lm.blocks)):
        scores = [lp for lp, _ in make_lm("gpt2", mode="hypothesis", layer=layer).loglikelihood(requests)]
        hits = [max(range(3), key=scores[3 * i : 3 * i + 3].__getitem__) == ex.gold for i, ex in enumerate(dev)]
        assert curve[layer] == pytest.approx(sum(hits) / len(dev))
