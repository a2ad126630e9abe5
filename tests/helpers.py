"""What several test modules share, so that no test module imports another: tiny random models of several
architectures, hand-made requests in the paper's prompt format, and the commands the slow tests run.

lm-eval task objects built in memory live in ``tests/tasks.py`` (importing it installs lm-eval's task hooks);
fixtures live in ``tests/conftest.py`` and are built from what is here.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import torch
import torch.nn.modules.module as module_hooks
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


# ---------------------------------------------------------------------------------------------- isolation
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
HOOK_KEYS = set(HOOKS) | {
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
}
# The package's own caches on a model, free to come and go: the fingerprint checks itself against the weights'
# version counters; a branch-mask kind cached during a test is checked against the unchanged model.
CACHED_ON_THE_MODEL = {"_taskvec_fingerprint", "_taskvec_branch_mask"}
# transformers hooks every layer the first time a model returns hidden states (output_hidden_states=True), and
# marks it so: both are taken off again after each test, so each test starts from the model as built.
CAPTURING_HOOKS, CAPTURING_MARK = "transformers.utils.output_capturing", "_output_capturing_hooks_installed"


class SessionState:
    """The objects the session-scoped fixtures hand to every test (tiny models, the tokenizer, saved model
    folders) and the package's module globals, to find what a test left behind in them: ``snapshot`` before
    a test, ``leaks`` after it (which also undoes what it finds, so that a leak fails its own test only)."""

    def __init__(self):
        self.models: dict[str, torch.nn.Module] = {}
        self.built: dict[str, dict] = {}  # each model's state as built, for tests that build it
        self.pristine: dict[str, dict[str, torch.Tensor]] = {}  # each model's weights as built
        self.tokenizers: list = []
        self.folders: list = []

    def add_model(self, name: str, model: torch.nn.Module) -> None:
        self.models[name] = model
        self.built[name] = _model_state(model)
        self.pristine[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def snapshot(self) -> dict:
        return {
            "models": {name: _model_state(model) for name, model in self.models.items()},
            "tokenizers": [_attributes(tok) for tok in self.tokenizers],
            "folders": [_listing(folder) for folder in self.folders],
            "globals": _package_globals(),
        }

    def leaks(self, before: dict) -> list[str]:
        """What differs from ``before`` in the shared objects, each undone; [] when the test left nothing."""
        found = []
        for hooks in (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks):
            if hooks:
                found.append(f"a global module hook is still registered ({len(hooks)})")
                hooks.clear()
        for name, model in self.models.items():
            found += self._model_leaks(name, model, before["models"].get(name, self.built[name]))
        for tok, old in zip(self.tokenizers, before["tokenizers"]):
            found += _restore("the session tokenizer", vars(tok), old)
        for folder, old in zip(self.folders, before["folders"]):
            if _listing(folder) != old:
                found.append(f"saved model folder {folder}: files written, changed or removed (copy it first)")
        for module_name, old in before["globals"].items():
            module = sys.modules.get(module_name)
            if module is None:
                continue
            found += _restore(module_name, vars(module), old["module"], new_names=True)
            for cls_name, cls_vars in old["classes"].items():
                cls = vars(module).get(cls_name)
                if isinstance(cls, type):
                    found += _restore_class(f"{module_name}.{cls_name}", cls, cls_vars)
        return found

    def _model_leaks(self, name: str, model, old: dict) -> list[str]:
        found = []
        modules = list(model.named_modules())
        for path, module in modules:
            where = f"{name} model{'.' + path if path else ''}"
            _take_off_capturing_hooks(module, was_marked=CAPTURING_MARK in old["modules"].get(path, {}))
            for kind in HOOKS:
                if getattr(module, kind):
                    found.append(f"{where}: {kind} left registered ({len(getattr(module, kind))})")
                    getattr(module, kind).clear()
            if "forward" in vars(module):
                found.append(f"{where}: an instance `forward` stands in for the class's")
                del vars(module)["forward"]
            if path in old["modules"]:
                found += _restore(
                    where, vars(module), old["modules"][path], ignore=CACHED_ON_THE_MODEL if not path else ()
                )
        if _versions(model, modules) != old["weights"]:  # written to since: compared with the weights as built
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, self.pristine[name][k])]
            if changed:
                found.append(f"{name} model: weights changed in place ({', '.join(changed)})")
                with torch.no_grad():
                    for key in changed:
                        model.state_dict()[key].copy_(self.pristine[name][key])
        for which, config, config_old in zip(("config", "generation_config"), _config_objects(model), old["configs"]):
            if config is not None and config_old is not None:
                found += _restore(f"{name} model.{which}", vars(config), config_old)
        return found + _branch_mask_check(name, model, old)  # on the model as it was


def _take_off_capturing_hooks(module, was_marked: bool) -> None:
    for key, hook in list(module._forward_hooks.items()):
        if getattr(hook, "__module__", None) == CAPTURING_HOOKS:
            del module._forward_hooks[key]
            for kind in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, kind, {}).pop(key, None)
    if not was_marked:
        vars(module).pop(CAPTURING_MARK, None)


def _branch_mask_check(name: str, model, old: dict) -> list[str]:
    """A branch-mask kind cached during the test must be what the unchanged model gives."""
    unset = object()
    now, before = vars(model).get("_taskvec_branch_mask", unset), old["modules"][""].get("_taskvec_branch_mask", unset)
    if now is unset or now == before:
        return []
    from lm_eval_taskvec.extraction import branch_mask_kind

    cached = vars(model).pop("_taskvec_branch_mask")
    fresh = branch_mask_kind(model)
    if cached != fresh:
        return [f"{name} model: _taskvec_branch_mask={cached!r} was cached under a changed model ({fresh!r})"]
    return []


def _model_state(model) -> dict:
    modules = list(model.named_modules())
    return {
        "modules": {path: _attributes(module) for path, module in modules},
        "weights": _versions(model, modules),
        "configs": tuple(_attributes(c) if c is not None else None for c in _config_objects(model)),
    }


def _attributes(obj) -> dict:
    """A shallow copy of ``obj.__dict__``, one level deeper for plain containers (mutated in place)."""
    return {k: (type(v)(v) if type(v) in (dict, list, set) else v) for k, v in vars(obj).items() if k not in HOOK_KEYS}


def _same(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot compare (tensors inside a dict): not the same
        return False


def _restore(where: str, current: dict, old: dict, ignore=(), new_names: bool = False) -> list[str]:
    """Put ``current`` (a __dict__) back to ``old``, but for the names in ``ignore`` (and new names, with
    ``new_names``: a module's globals gain its submodules as they are imported)."""
    found = []
    for key in list(current):
        if key in HOOK_KEYS or key in ignore:
            continue
        if key not in old:
            if not new_names:
                found.append(f"{where}: attribute {key!r} added")
                del current[key]
        elif not _same(current[key], old[key]):
            found.append(f"{where}: attribute {key!r} changed")
            current[key] = old[key]
    for key in old.keys() - current.keys() - set(ignore):
        found.append(f"{where}: attribute {key!r} removed")
        current[key] = old[key]
    return found


def _restore_class(where: str, cls: type, old: dict) -> list[str]:
    found = []
    for key, value in old.items():
        if key not in vars(cls) or not _same(vars(cls)[key], value):
            found.append(f"{where}.{key} replaced (use monkeypatch)")
            setattr(cls, key, value)
    return found


def _versions(model, modules=None) -> list:
    """Each weight's and buffer's storage and version counter (bumped by every in-place write)."""
    return [
        (path, name, t.data_ptr(), t._version)
        for path, module in modules or model.named_modules()
        for name, t in (*module._parameters.items(), *module._buffers.items())
        if t is not None
    ]


def _config_objects(model) -> tuple:
    return getattr(model, "config", None), getattr(model, "generation_config", None)


def _listing(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _package_globals() -> dict:
    """Each imported lm_eval_taskvec module's globals and its classes' attributes (what tests monkeypatch)."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("lm_eval_taskvec"):
            continue
        names = dict(vars(module))
        classes = {k: dict(vars(v)) for k, v in names.items() if isinstance(v, type) and v.__module__ == module_name}
        found[module_name] = {"module": names, "classes": classes}
    return found


# ---------------------------------------------------------------------------------------------- hand-written θ
def block_output_hook(block, record=None, write=None):
    """A forward hook on a decoder block that records its output at (row 0, ``record``) or writes ``write`` =
    (position, vector) over it, whether the block returns a tensor or a tuple."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if record is not None:
            record.append(hidden[0, -1].detach().clone())
        if write is not None:
            hidden = hidden.clone()
            hidden[0, write[0]] = write[1].to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return None

    return block.register_forward_hook(hook)


def greedy_answer(lm, model, block, ids, theta, kwargs) -> str:
    """Greedy decoding with θ written at the prompt's last token in the prompt's pass only, cut as HFLM cuts."""
    steps = int(kwargs.get("max_gen_toks") or lm.max_gen_toks)
    handle = block_output_hook(block, write=(len(ids) - 1, theta))
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    handle.remove()
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    generated, past = [], getattr(out, name, None) or out.past_key_values
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token == lm.eot_token_id:
            break
        with torch.no_grad():
            out = model(torch.tensor([[token]]), use_cache=True, **{name: past})
        past = getattr(out, name, None) or out.past_key_values
    text = lm.tok_decode(generated)
    for stop in [*(kwargs.get("until") or []), lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)]:
        if stop:
            text = text.split(stop)[0]
    return text


# ---------------------------------------------------------------------------------------------- chat prompts by hand
# A template of the ChatML kind that, like SmolLM2's, adds a default system turn when none is given, and ends
# its generation prompt with whitespace (which HFLM moves onto a likelihood request's continuation).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}s>Be brief.</s>\n{% endif %}"
    "{% for m in messages %}{{ m['role'][0] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}a>\n{% endif %}"
)


def record_chats(tokenizer, monkeypatch) -> dict[str, list[dict]]:
    """Chat string -> the turns the tokenizer rendered it from, for as long as the test runs."""
    chats, render = {}, tokenizer.apply_chat_template

    def apply_chat_template(conversation, **kwargs):
        rendered = render(conversation, **kwargs)
        if kwargs.get("tokenize") is False:
            chats[rendered] = json.loads(json.dumps(conversation))
        return rendered

    monkeypatch.setitem(tokenizer.__dict__, "apply_chat_template", apply_chat_template)
    return chats


def render_chat(tokenizer, turns: list[dict]) -> str:
    """``turns`` through the tokenizer's own template, as HFLM renders them: the generation prompt after a user
    turn, the assistant turn continued otherwise."""
    last_is_assistant = turns[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=not last_is_assistant, continue_final_message=last_is_assistant
    )


def chat_prompts(tokenizer, turns: list[dict], own_texts, dummies) -> tuple[str, list[str]]:
    """By hand: the query-only chat and θ's chats [S, x'] of a chat context's ``turns``. S is every turn before
    the last user turn and, single-turn, that turn's text before the query's own text (the longest of
    ``own_texts`` it ends with); ``dummies`` are JSON lists of (role, content) turns, the user's first."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    head, text, tail = turns[:last], turns[last]["content"], turns[last + 1 :]
    query_text = max((q for q in own_texts if text.endswith(q)), key=len)
    prefix = text[: len(text) - len(query_text)]
    query = render_chat(tokenizer, [{"role": "user", "content": query_text}, *tail])
    prompts = []
    for dummy in dummies:
        (_, dummy_text), *dummy_tail = json.loads(dummy)
        dummy_turns = [
            {"role": "user", "content": prefix + dummy_text},
            *({"role": r, "content": c} for r, c in dummy_tail),
        ]
        prompts.append(render_chat(tokenizer, [*head, *dummy_turns]))
    return query, prompts
