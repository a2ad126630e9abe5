"""Fixtures: tiny random models of several architectures with a small trained BPE tokenizer, offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.helpers import SessionState, make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SESSION = SessionState()  # what the session-scoped fixtures share between tests


def _corpus():
    for a in LETTERS:
        for b in LETTERS[:6]:
            yield f"example:{a}->{a.upper()}\nexample: {a}{b}-> {b}{a}\nQuestion: {a}?\n\nAnswer: {b}"


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    shared = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    SESSION.tokenizers.append(shared)
    return shared


@pytest.fixture(scope="session")
def model_factory(tokenizer):
    """One model per architecture for the whole session: copy it (``copy.deepcopy``) before editing it."""
    cache = {}

    def build(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = make_model(arch, len(tokenizer))
            SESSION.add_model(arch, cache[arch])
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tokenizer):
    """``saved_model(arch="llama", **config_edits)``: a folder holding a tiny random model (edited as
    ``make_model`` edits it, e.g. ``max_position_embeddings=2048``) and the tokenizer, for what loads
    ``pretrained=<path>``. One folder per distinct arguments for the whole session: copy it before writing
    into it."""
    cache = {}

    def save(arch: str = "llama", **config_edits):
        key = (arch, tuple(sorted(config_edits.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"saved-{arch}")
            make_model(arch, len(tokenizer), **config_edits).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = path
            SESSION.folders.append(path)
        return cache[key]

    return save


@pytest.fixture
def make_lm(model_factory, tokenizer):
    """An hf-taskvec (or, with stock=True, a stock HFLM) wrapper around a tiny model: the session's model of
    ``arch``, or ``pretrained=`` a model of the test's own (a copy it may edit)."""

    def build(arch: str = "llama", stock: bool = False, **kwargs):
        from lm_eval.models.huggingface import HFLM

        from lm_eval_taskvec.model import TaskVectorLM

        cls = HFLM if stock else TaskVectorLM
        kwargs.setdefault("batch_size", 4)
        if not stock:  # hand-made requests come from no loaded task: split them at the paper's delimiter
            kwargs.setdefault("fewshot_delimiter", "\n")
        if "pretrained" not in kwargs:
            kwargs["pretrained"] = model_factory(arch)
        return cls(tokenizer=tokenizer, device="cpu", **kwargs)

    return build


@pytest.fixture
def session_state():
    """What the session shares between tests, as the leak guard below watches it."""
    return SESSION


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Fails a test that leaves anything behind in what the session shares: a hook or an instance ``forward``
    on a module of a session model, a changed weight, model attribute or config, a changed tokenizer, a file
    in a saved model folder, a package global or class attribute replaced by hand. What it finds it undoes,
    so later tests run on the models as built."""
    before = SESSION.snapshot()
    yield
    leaks = SESSION.leaks(before)
    if leaks:
        pytest.fail("left behind in session-shared objects:\n  " + "\n  ".join(leaks), pytrace=False)
