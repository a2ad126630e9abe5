"""Chat templates (``--apply_chat_template``), multi-turn and single-turn, generation and multiple choice: the
oracles come from stock HFLM and from the tokenizer's own ``apply_chat_template``, document by document.

- ``regular`` is stock ``HFLM`` with the same chat flags and shots, bit for bit;
- ``baseline`` is stock ``HFLM`` with the same chat flags 0-shot: both see the one-turn chat of the query alone;
- ``hypothesis`` is a re-implementation written here: the turns lm-eval handed the tokenizer (recorded at the
  tokenizer), split before the query's user turn (single-turn: the query's text cut off the end of the one user
  turn), θ = block L's output at the last token of the tokenizer's rendering of [S turns, dummy's user turn]
  with the generation prompt, written at the last token of the rendering of the query's turns alone.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lm_eval_taskvec._autoload import LOADED_TASKS
from lm_eval_taskvec.model import TaskVectorLM
from tests.helpers import (
    CHAT_TEMPLATE,
    block_output_hook,
    chat_prompts,
    greedy_answer,
    make_model,
    record_chats,
    render_chat,
)
from tests.tasks import make_task

LAYER = 1
LIMIT = 4
TASKS = {
    "generation": {},
    "gen_prefix": {"gen_prefix": "Out:"},  # the query's chat ends in an assistant turn that is continued
    "multiple_choice": {
        "output_type": "multiple_choice",
        "doc_to_choice": "{{[answers[0], input, 'zz']}}",
        "doc_to_target": 0,
        "generation_kwargs": None,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
}
SHAPES = {"multiturn": True, "singleturn": False}
MANAGER = TaskManager(include_defaults=False)  # the tasks are objects: no folder of YAMLs to index at each run


@dataclass
class Chat:
    tokenizer: object  # a copy of the session tokenizer, rendering CHAT_TEMPLATE
    turns: dict  # chat string -> the turns the tokenizer rendered it from


@pytest.fixture
def chat(tokenizer, monkeypatch) -> Chat:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return Chat(tok, record_chats(tok, monkeypatch))


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("llama", len(tokenizer), max_position_embeddings=1024)


def evaluate(lm, kind: str, shots: int, multiturn: bool, **kwargs) -> dict:
    results = simple_evaluate(
        model=lm,
        task_manager=MANAGER,
        tasks=[make_task(f"chat_{kind}", **TASKS[kind])],
        num_fewshot=shots,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=True,
        fewshot_as_multiturn=multiturn,
        **kwargs,
    )
    return results


def by_document(results: dict, kind: str) -> dict:
    return {s["doc_id"]: s["resps"] for s in results["samples"][f"chat_{kind}"]}


def close(a, b, tol=1e-4) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a[1] == b[1] and abs(a[0] - b[0]) <= tol


def hand_written_hypothesis(lm, chat: Chat, model, request, layer=LAYER):
    """Hypothesis mode's answer to one request, from the turns lm-eval gave the tokenizer and transformers alone
    (which dummies is the plugin's seeded draw; their prompts are built here)."""
    (plan,) = lm.planner.plan([request])
    own = [LOADED_TASKS[request.task_name].doc_to_text(request.doc)]
    query, prompts = chat_prompts(chat.tokenizer, chat.turns[request.args[0]], own, plan.theta_key.dummies)
    assert plan.query == query and list(plan.theta_key.texts) == prompts
    likelihood = request.request_type == "loglikelihood"
    block, states = model.model.layers[layer], []
    for prompt in prompts:
        handle = block_output_hook(block, record=states)
        with torch.no_grad():
            model(torch.tensor([lm.tok_encode(prompt.rstrip() if likelihood else prompt)]))
        handle.remove()
    theta = torch.stack(states).float().mean(0)
    if not likelihood:
        return greedy_answer(lm, model, block, lm.tok_encode(query), theta, request.args[1])
    context_enc, continuation_enc = lm.encode_pair(query, request.args[1])
    handle = block_output_hook(block, write=(len(context_enc) - 1, theta))
    with torch.no_grad():
        logits = model(torch.tensor([context_enc + continuation_enc[:-1]])).logits[0].float().log_softmax(-1)
    handle.remove()
    rows, target = logits[len(context_enc) - 1 :], torch.tensor(continuation_enc)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(TASKS))
def test_chat_prompts_meet_the_oracles_document_by_document(kind, shape, chat, model):
    multiturn = SHAPES[shape]
    args = dict(pretrained=model, tokenizer=chat.tokenizer, device="cpu", batch_size=4)
    stock = by_document(evaluate(HFLM(**args), kind, 3, multiturn), kind)
    zero_shot = by_document(evaluate(HFLM(**args), kind, 0, multiturn), kind)
    for mode, expected in (("regular", stock), ("baseline", zero_shot)):
        got = by_document(evaluate(TaskVectorLM(mode=mode, layer=LAYER, **args), kind, 3, multiturn), kind)
        assert got.keys() == expected.keys() and len(got) == LIMIT
        for doc_id, resps in expected.items():
            assert all(close(g[0], e[0], 1e-5) for g, e in zip(got[doc_id], resps, strict=True)), (mode, doc_id)
            if mode == "regular":
                assert got[doc_id] == resps  # bit for bit
    lm = TaskVectorLM(mode="hypothesis", layer=LAYER, **args)
    results = evaluate(lm, kind, 3, multiturn)
    hypothesis = by_document(results, kind)
    task = LOADED_TASKS[f"chat_{kind}"]
    assert len(hypothesis) == LIMIT
    for doc_id, resps in hypothesis.items():
        requests = sorted((r for r in task.instances if r.doc_id == doc_id), key=lambda r: r.idx)
        contexts = {r.args[0] for r in requests}
        assert len(contexts) == 1 and contexts.pop().count("u>") == (4 if multiturn else 1)  # the shape asked for
        expected = [hand_written_hypothesis(lm, chat, model, r) for r in requests]
        assert all(close(g[0], e) for g, e in zip(resps, expected, strict=True)), (doc_id, resps, expected)
    # θ's token, in the results JSON: the generation prompt's last token (likelihood: before the whitespace
    # HFLM moves onto the continuation; gen_prefix: the prefix's last token)
    request_type = "loglikelihood" if kind == "multiple_choice" else "generate_until"
    token = {"generation": "\n", "gen_prefix": ":", "multiple_choice": ">"}[kind]
    assert results["config"]["taskvec"]["theta_token"] == {f"chat_{kind}": {request_type: token}}


def test_the_system_turn_belongs_to_s_and_the_query_alone_keeps_the_templates_default(chat, model):
    """--system_instruction is a turn of S: θ's prompts hold it, the query-only prompt does not (and gets the
    template's own default system turn, as stock HFLM's 0-shot chat without an instruction does)."""
    lm = TaskVectorLM(pretrained=model, tokenizer=chat.tokenizer, device="cpu", mode="hypothesis", layer=LAYER)
    evaluate(lm, "generation", 2, True, system_instruction="Capitalize.")
    task = LOADED_TASKS["chat_generation"]
    request = task.instances[0]
    (plan,) = lm.planner.plan([request])
    assert request.args[0].startswith("s>Capitalize.</s>\nu>example:")
    assert plan.query == f"s>Be brief.</s>\nu>{task.doc_to_text(request.doc)}</s>\na>\n"
    assert all(p.startswith("s>Capitalize.</s>\nu>example:") for p in plan.theta_key.texts)
    assert all(p.endswith("-></s>\na>\n") and p.count("u>") == 3 for p in plan.theta_key.texts)


def test_hypothesis_logs_the_first_query_only_prompt_once_per_task(chat, model, caplog):
    lm = TaskVectorLM(pretrained=model, tokenizer=chat.tokenizer, device="cpu", mode="hypothesis", layer=LAYER)
    with caplog.at_level(logging.INFO):
        evaluate(lm, "generation", 3, True)
    said = [r.getMessage() for r in caplog.records if "the model runs the query alone" in r.getMessage()]
    assert len(said) == 1 and "θ written at its last token '\\n'" in said[0]
    assert "'s>Be brief.</s>\\nu>example:" in said[0]


def test_a_zero_shot_chat_is_refused_like_a_zero_shot_prompt(chat, model):
    """The template's own system turn (or --system_instruction) is not a demonstration."""
    lm = TaskVectorLM(pretrained=model, tokenizer=chat.tokenizer, device="cpu", mode="hypothesis", layer=LAYER)
    with pytest.raises(ValueError, match="runs 0-shot: its context has no demonstrations.*--num_fewshot k >= 1"):
        evaluate(lm, "generation", 0, True, system_instruction="Capitalize.")


def test_an_empty_chat_query_is_refused(chat, model):
    from tests.tasks import requests_of

    rows = [{"input": "", "answers": ["x"]}] + [{"input": c, "answers": [c]} for c in "abcd"]
    task = make_task(splits={"train": rows[1:], "test": rows}, doc_to_text="{{input}}")
    lm = TaskVectorLM(pretrained=model, tokenizer=chat.tokenizer, device="cpu", mode="hypothesis", layer=LAYER)
    requests = requests_of(task, limit=2, apply_chat_template=True, chat_template=lm.apply_chat_template)
    with pytest.raises(ValueError, match="renders an empty query"):
        lm.generate_until(requests)


def test_cached_requests_are_refused_naming_the_flag(chat, model, tmp_path, monkeypatch):
    """lm-eval's request cache (--cache_requests true) hands back contexts without rendering them: their turns
    are unknown, so the patched modes refuse them before any task runs, naming the flag and the fix."""
    monkeypatch.setenv("LM_HARNESS_CACHE_PATH", str(tmp_path))
    monkeypatch.setattr("lm_eval.caching.cache.PATH", str(tmp_path))
    args = dict(pretrained=model, tokenizer=chat.tokenizer, device="cpu", batch_size=4)
    evaluate(HFLM(**args), "generation", 3, True, cache_requests=True)  # writes the cache
    from lm_eval_taskvec import chat as chat_module

    monkeypatch.setattr(chat_module, "_RENDERED", {})  # a new process: nothing rendered here yet
    with pytest.raises(ValueError, match="--cache_requests true.*run without --cache_requests"):
        evaluate(TaskVectorLM(mode="baseline", **args), "generation", 3, True, cache_requests=True)


def test_layer_auto_builds_its_dev_prompts_with_the_runs_chat_settings(chat, model):
    """The dev prompts are lm-eval's chat contexts (same template, same shape), their gold is the assistant's
    answer after the generation prompt, and the layer cache keys on them: a chat run never reads a plain
    run's choice."""
    from lm_eval_taskvec.selection.cache import cache_key
    from lm_eval_taskvec.selection.dev import dev_sets

    args = dict(pretrained=model, tokenizer=chat.tokenizer, device="cpu", batch_size=4)
    keys = {}
    for multiturn in (True, False, None):  # None: plain
        lm = TaskVectorLM(mode="hypothesis", num_dev=6, layer_cache="off", **args)
        flags = {} if multiturn is None else dict(apply_chat_template=True, fewshot_as_multiturn=multiturn)
        results = simple_evaluate(
            model=lm,
            tasks=[make_task("chat_auto")],
            task_manager=MANAGER,
            num_fewshot=3,
            limit=2,
            bootstrap_iters=0,
            **flags,
        )
        choice = results["config"]["taskvec"]["layer_selection"]["chat_auto"]
        assert 0 <= choice["layer"] < 3 and choice["num_dev"] == 6
        sets = dev_sets(lm.settings, "chat_auto")
        for ex in sets[0].examples:
            (request,) = ex.requests
            assert ex.gold == request.doc["answers"][0]
            if multiturn is None:
                assert request.args[0] not in chat.turns
                continue
            turns = chat.turns[request.args[0]]  # rendered by the tokenizer from lm-eval's turns
            assert [t["role"] for t in turns].count("user") == (4 if multiturn else 1)
            assert request.args[0] == render_chat(chat.tokenizer, turns) and request.args[0].endswith("-></s>\na>\n")
        keys[multiturn] = cache_key(lm.model, lm.revision, len(lm.blocks), lm.settings, "chat_auto", sets)
    assert len(set(keys.values())) == 3


def test_use_cache_gives_the_same_answers_under_a_chat_template(chat, model, tmp_path):
    """--use_cache keys answers on the request, whose context is the full chat: the run that writes the
    database and the run that reads it both answer as a run without it."""
    args = dict(pretrained=model, tokenizer=chat.tokenizer, device="cpu", batch_size=4)
    for kind in ("generation", "multiple_choice"):
        fresh = by_document(evaluate(TaskVectorLM(mode="hypothesis", layer=LAYER, **args), kind, 3, True), kind)
        for _ in ("writes", "reads"):
            lm = TaskVectorLM(mode="hypothesis", layer=LAYER, **args)
            assert by_document(evaluate(lm, kind, 3, True, use_cache=str(tmp_path / kind)), kind) == fresh


# ---------------------------------------------------------------------------------------------- the commands
def test_the_commands_take_lm_evals_chat_options_with_its_defaults(monkeypatch):
    from lm_eval_taskvec import cli
    from lm_eval_taskvec.comparison.cli import chat_options

    seen = []
    monkeypatch.setattr(cli, "run_sweep", seen.append)
    monkeypatch.setattr("lm_eval_taskvec.analyses.export.main", seen.append)
    for argv, expected in (
        ([], {"apply_chat_template": False, "fewshot_as_multiturn": False}),
        (["--apply_chat_template"], {"apply_chat_template": True, "fewshot_as_multiturn": True}),
        (["--apply_chat_template", "tool_use"], {"apply_chat_template": "tool_use", "fewshot_as_multiturn": True}),
        (
            ["--apply_chat_template", "--fewshot_as_multiturn", "false"],
            {"apply_chat_template": True, "fewshot_as_multiturn": False},
        ),
    ):
        for command in ("sweep", "export"):
            cli.main([command, "--tasks", "tv_list_first", *argv])
            assert chat_options(seen.pop()) == expected, (command, argv)
    cli.main(["sweep", "--tasks", "tv_list_first", "--fewshot_as_multiturn"])
    with pytest.raises(SystemExit, match="--fewshot_as_multiturn needs --apply_chat_template"):
        chat_options(seen.pop())


@pytest.fixture
def chat_model_dir(tmp_path, tokenizer, model):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "chat_model")
    tok.save_pretrained(tmp_path / "chat_model")
    return tmp_path / "chat_model"


def test_compare_runs_each_mode_as_lm_eval_runs_it_under_the_chat_template(chat_model_dir, tmp_path, monkeypatch):
    """taskvec compare --apply_chat_template --fewshot_as_multiturn false: each mode's answers are those of a
    fresh model run by simple_evaluate with the same chat options."""
    from lm_eval_taskvec.comparison import compare

    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    out, task = tmp_path / "out", "tv_letter_to_upper"
    common = dict(limit=4, batch_size=4, device="cpu")
    compare(
        model_args=f"pretrained={chat_model_dir},layer=1",
        tasks=task,
        output_path=out,
        log_samples=True,
        apply_chat_template=True,
        fewshot_as_multiturn=False,
        **common,
    )
    manager = TaskManager()  # indexes lm-eval's task folders once for the three runs
    for mode in ("regular", "baseline", "hypothesis"):
        (samples,) = (out / mode).glob(f"*/samples_{task}_*.jsonl")
        logged = sorted(
            (json.loads(line) for line in samples.read_text().split("\n") if line), key=lambda s: s["doc_id"]
        )
        lm = TaskVectorLM(pretrained=str(chat_model_dir), mode=mode, layer=1, batch_size=4, device="cpu")
        alone = simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=4,
            log_samples=True,
            apply_chat_template=True,
            fewshot_as_multiturn=False,
        )
        expected = sorted(alone["samples"][task], key=lambda s: s["doc_id"])
        assert [s["resps"] for s in logged] == [s["resps"] for s in expected], mode
        assert all(s["arguments"]["gen_args_0"]["arg_0"].count("u>") == 1 for s in logged)  # single-turn chats


def test_export_renders_theta_with_the_chat_template(chat_model_dir, tmp_path, monkeypatch):
    """taskvec export --apply_chat_template: θ's demonstrations are multi-turn chats (lm_eval's default) rendered
    by the model's template, and the file says so."""
    from lm_eval_taskvec import cli
    from lm_eval_taskvec.thetafile import load_thetas

    monkeypatch.setattr("lm_eval.utils.setup_logging", lambda *a, **k: None)
    out = tmp_path / "export"
    argv = ["export", "--model_args", f"pretrained={chat_model_dir}", "--tasks", "tv_letter_to_upper", "--layer", "1"]
    cli.main(
        [
            *argv,
            "--num_sets",
            "2",
            "--num_fewshot",
            "3",
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--apply_chat_template",
        ]
    )
    lm = TaskVectorLM(pretrained=str(chat_model_dir), mode="hypothesis", layer=1, device="cpu")
    (stored,) = load_thetas(out / "thetas.safetensors", lm).thetas.values()
    context = stored.info["prompt_format"]["example_context"]
    assert stored.info["prompt_format"]["chat"] == {"apply_chat_template": True, "fewshot_as_multiturn": True}
    assert context.startswith("s>Be brief.</s>\nu>") and context.count("u>") == 4 and context.endswith("</s>\na>\n")


def test_vocab_reads_theta_from_the_chat_of_the_demonstrations_and_the_dummy(chat_model_dir, tmp_path, monkeypatch):
    """taskvec vocab under the chat template, one set, one dummy, at the last block: the top tokens are the
    model's own next tokens after [S turns, dummy's user turn] rendered by hand with the tokenizer's template."""
    from lm_eval_taskvec.analyses import common, vocab

    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    lm = TaskVectorLM(pretrained=str(chat_model_dir), mode="hypothesis", num_dummy=1, device="cpu")
    chats = record_chats(lm.tokenizer, monkeypatch)
    options = {"apply_chat_template": True, "fewshot_as_multiturn": True}
    tasks = common.load_tasks("tv_letter_to_upper", None, lm, options)
    last = len(lm.blocks) - 1
    result = vocab.vocab_projection(lm, tasks, tmp_path / "out", layers=[str(last)], top_k=5, num_sets=1, num_fewshot=3)
    (request,) = common.demonstration_sets(tasks["tv_letter_to_upper"], 1, 3, seed=1234)
    turns = chats[request.args[0]]
    (plan,) = lm.plan([request], layer=last)  # the dummy the plugin drew; its θ prompt is rendered here
    _, (prompt,) = chat_prompts(lm.tokenizer, turns, [turns[-1]["content"]], plan.theta_key.dummies)
    assert prompt.startswith("s>Be brief.</s>\nu>") and prompt.count("u>") == 4 and prompt.endswith("a>\n")
    with torch.no_grad():
        logits = lm.model(torch.tensor([lm.tok_encode(prompt)])).logits[0, -1]
    (entry,) = result["entries"]
    assert [t["id"] for t in entry["tokens"]] == logits.topk(5).indices.tolist()


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_smollm2_meets_the_oracles_under_its_own_chat_template(shape, monkeypatch):
    """SmolLM2-135M-Instruct (embedded) with its own template (and its default system turn), θ at block 20 of
    30, on 3 documents of tv_letter_to_upper (5-shot generation): regular is stock HFLM with the chat flags,
    baseline stock 0-shot, hypothesis the hand-written re-implementation."""
    pytest.importorskip("gguf")
    from lm_eval_taskvec.embedded import embedded_model_path

    stock = HFLM(pretrained=embedded_model_path(), device="cpu", batch_size=4)
    chat = Chat(stock.tokenizer, record_chats(stock.tokenizer, monkeypatch))
    task, layer, manager = "tv_letter_to_upper", 20, TaskManager()
    kwargs = dict(tasks=[task], task_manager=manager, limit=3, log_samples=True, bootstrap_iters=0)
    kwargs |= dict(apply_chat_template=True, fewshot_as_multiturn=SHAPES[shape], gen_kwargs="max_gen_toks=8")

    def run(lm, **extra):
        return {s["doc_id"]: s["resps"] for s in simple_evaluate(model=lm, **kwargs, **extra)["samples"][task]}

    args = dict(pretrained=stock.model, tokenizer=stock.tokenizer, device="cpu", batch_size=4)
    assert run(TaskVectorLM(mode="regular", **args)) == run(stock)
    assert run(TaskVectorLM(mode="baseline", **args)) == run(stock, num_fewshot=0)
    lm = TaskVectorLM(mode="hypothesis", layer=layer, **args)
    got = run(lm)
    for doc_id, resps in got.items():
        (request,) = [r for r in LOADED_TASKS[task].instances if r.doc_id == doc_id]
        assert resps == [[hand_written_hypothesis(lm, chat, stock.model, request, layer)]], doc_id
