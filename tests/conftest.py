"""Fixtures: tiny random models of several architectures with a small trained BPE tokenizer, offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


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
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _configs(vocab: int) -> dict:
    # A wide initialisation keeps random models' greedy outputs input-dependent, so tests can see a wrong patch.
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    return {
        "gpt2": transformers.GPT2Config(n_positions=256, n_embd=32, n_layer=3, n_head=4, **common),
        "gptj": transformers.GPTJConfig(n_positions=256, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, **common),
        "gpt_neox": transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        ),
        "llama": transformers.LlamaConfig(**llama_like),
        "mistral": transformers.MistralConfig(**llama_like),
        "qwen2": transformers.Qwen2Config(**llama_like),
        "gemma": transformers.GemmaConfig(head_dim=8, **llama_like),
    }


ARCHITECTURES = list(_configs(400))


def make_model(arch: str, vocab: int):
    torch.manual_seed(0)
    config = _configs(vocab)[arch]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def model_factory(tokenizer):
    cache = {}

    def build(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = make_model(arch, len(tokenizer))
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a model folder, for commands that load ``pretrained=<path>``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def make_lm(model_factory, tokenizer):
    """An hf-taskvec (or, with stock=True, a stock HFLM) wrapper around a tiny model."""

    def build(arch: str = "llama", stock: bool = False, **kwargs):
        from lm_eval.models.huggingface import HFLM

        from lm_eval_taskvec.model import TaskVectorLM

        cls = HFLM if stock else TaskVectorLM
        kwargs.setdefault("batch_size", 4)
        if not stock:  # hand-made requests come from no loaded task: split them at the paper's delimiter
            kwargs.setdefault("fewshot_delimiter", "\n")
        return cls(pretrained=model_factory(arch), tokenizer=tokenizer, device="cpu", **kwargs)

    return build
