"""What several test modules share, so that no test module imports another: tiny random models of several
architectures, hand-made requests in the paper's prompt format, and the commands the slow tests run.

lm-eval task objects built in memory live in ``tests/tasks.py`` (importing it installs lm-eval's task hooks);
fixtures live in ``tests/conftest.py`` and are built from what is here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers
from lm_eval.api.instance import Instance

# ---------------------------------------------------------------------------------------------- tiny models


def model_configs(vocab: int) -> dict:
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


ARCHITECTURES = list(model_configs(400))


def make_model(arch: str, vocab: int, **config_edits):
    """A fresh tiny random model (seeded: the same weights every time), with ``config_edits`` set on its config
    before it is built (e.g. ``num_hidden_layers=4``)."""
    torch.manual_seed(0)
    config = model_configs(vocab)[arch]
    for name, value in config_edits.items():
        if not hasattr(config, name):
            raise AttributeError(f"{type(config).__name__} has no {name!r} to edit")
        setattr(config, name, value)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------------------------------------- requests
GEN = {"until": ["\n"], "do_sample": False, "max_gen_toks": 4}


def context(demos: str, query: str) -> str:
    """A few-shot context in the paper's format: one ``example:d->D`` line per demonstration, then the query."""
    return "".join(f"example:{d}->{d.upper()}\n" for d in demos) + f"example:{query}->"


def query_of(context: str) -> str:
    """The query of a context built by ``context``, written out independently of the code under test."""
    return "example:" + context.rsplit("\nexample:", 1)[1]


def gen_requests(task: str = "t") -> list[Instance]:
    # Different numbers of demonstrations and queries: contexts of different lengths in one batch.
    cases = [("abcde", "k"), ("fg", "mn"), ("hijklmnop", "q"), ("rs", "tuvw"), ("xyz", "b"), ("abc", "zz")]
    return [
        Instance("generate_until", {}, (context(d, q), dict(GEN)), i, (task, i, 1)) for i, (d, q) in enumerate(cases)
    ]


def ll_requests() -> list[Instance]:
    cases = [
        ("abcde", "k", "K"),
        ("fg", "mn", " MN"),
        ("hijklmnop", "q", "Q\nexample"),
        ("rs", "tuvw", "T"),
        ("abcde", "k", "KK"),
    ]  # the same context as the first, another continuation
    return [Instance("loglikelihood", {}, (context(d, q), c), i, ("t", i, 1)) for i, (d, q, c) in enumerate(cases)]


def logits(lm, text: str) -> torch.Tensor:
    """The model's logits over ``text`` tokenized as the model's regular path does: Tensor[tokens, vocab]."""
    return lm._model_call(torch.tensor([lm.tok_encode(text)]))[0]


# ---------------------------------------------------------------------------------------------- runs
def run_task(lm, task: str = "tv_list_first", limit: int = 4, **kwargs) -> dict:
    """``simple_evaluate`` of one of the project's tv_* tasks (only the project's tasks indexed: fast)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.tasks import task_dir

    tasks = TaskManager(include_path=str(task_dir()), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[task], task_manager=tasks, limit=limit, **kwargs)


def lm_eval_cli(tmp_path, model_args: str, *args: str) -> dict:
    """The stock ``lm_eval`` command with ``--model hf-taskvec`` on the CPU; returns its results JSON."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf-taskvec",
        "--model_args",
        model_args,
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
        "--log_samples",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.glob("*/results_*.json")
    return json.loads(result.read_text())
