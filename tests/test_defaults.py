"""Defaults a newcomer meets first: the device, batch_size=auto, the warnings and what the results JSON records."""

from __future__ import annotations

import logging

import pytest
import torch

import lm_eval_taskvec.model as model_module
from lm_eval_taskvec.model import TaskVectorLM
from tests.conftest import make_model
from tests.test_patching import GEN, gen_requests, ll_requests


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("given, cuda, expected", [
    (None, False, "cpu"), (None, True, "cuda"),
    ("cuda:0", False, "cpu"),  # lm_eval's CLI default when --device is left out
    ("cuda:0", True, "cuda:0"), ("cpu", True, "cpu"), ("mps", False, "mps"),
])
def test_device_is_cuda_when_available_else_cpu_unless_given(monkeypatch, given, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert model_module._device(given) == expected


def test_no_device_runs_on_this_cpu_machine_and_logs_it_once(model_dir, caplog):
    with caplog.at_level(logging.INFO):
        lm = TaskVectorLM(pretrained=model_dir, mode="regular")
    assert lm.device == torch.device("cpu")
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith(("Using device", "Device not specified", "Cuda Available"))] == [
        "Using device 'cpu'"]


def test_batch_size_auto_on_cpu_uses_a_fixed_size_without_probing(make_lm, monkeypatch, caplog):
    lm = make_lm(mode="hypothesis", layer=1, batch_size="auto")
    shapes = []
    call = lm._model_call
    monkeypatch.setattr(lm, "_model_call", lambda inps, *a, **k: shapes.append(tuple(inps.shape)) or call(inps, *a, **k))
    with caplog.at_level(logging.WARNING):
        scores = lm.loglikelihood(ll_requests())
        texts = lm.generate_until(gen_requests())
    assert max(rows for rows, _ in shapes) <= model_module.CPU_AUTO_BATCH_SIZE  # lm-eval's probe runs 64 rows
    assert max(width for _, width in shapes) < 40  # and max_length (256) columns
    fixed = make_lm(mode="hypothesis", layer=1, batch_size=model_module.CPU_AUTO_BATCH_SIZE)
    assert texts == fixed.generate_until(gen_requests())
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in fixed.loglikelihood(ll_requests())])
    warnings = [r.getMessage() for r in caplog.records if "batch_size=auto" in r.getMessage()]
    assert warnings == ["batch_size=auto on the CPU: no out-of-memory signal to probe with, so batch size 8 "
                        "(set one with --batch_size N)"]


@pytest.mark.parametrize("mode", ["regular", "hypothesis"])
def test_batch_size_auto_probes_generation_with_the_longest_real_prompt(make_lm, monkeypatch, mode):
    """On a GPU HFLM probes generate_until at max_length; we probe with the prompt the model will really see."""
    lm = make_lm(mode=mode, layer=1, batch_size="auto")
    probed = []
    monkeypatch.setattr(lm, "_detect_batch_size", lambda requests=None, pos=0: probed.append(lm._probe_tokens) or 4)
    lm.generate_until(gen_requests())
    texts = [r.args[0] for r in gen_requests()]
    if mode == "hypothesis":
        texts = [t.rsplit("\n", 1)[1] for t in texts]  # the query alone
    assert probed == [max(len(lm.tok_encode(t)) for t in texts) + GEN["max_gen_toks"]]


def test_the_probe_runs_at_that_length_on_an_accelerator(make_lm, monkeypatch):
    lm = make_lm(mode="regular", batch_size="auto")
    lm._device = torch.device("meta")  # stands in for a GPU: not a CPU, and tensors cost nothing
    shapes = []
    monkeypatch.setattr(lm, "_model_call", lambda inps, *a, **k: shapes.append(tuple(inps.shape)) or
                        torch.zeros(*inps.shape, 8))
    with lm._probing(37):
        assert lm._detect_batch_size() == lm.max_batch_size  # nothing ran out of memory
    assert set(shapes) == {(lm.max_batch_size, 37)}
