"""hf-taskvec's own model arguments, parsed and checked in one place, without torch.

lm-eval's CLI parses ``--model_args`` loosely (``layer=3`` is an int, ``layer=-1`` the float -1.0, ``0.6`` a
float, ``true`` a bool), and the Python API passes anything: every argument is read here, once, and bad input
gets a message naming the argument and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("regular", "hypothesis", "baseline")
AUTO = "auto"
VECTORS = ("prompt", "task_mean", "function_vector")
OPS = ("replace", "add")
# method -> (vector, op, scale): each part a model argument of its own, which overrides the preset's
METHODS = {
    "hendel": ("prompt", "replace", 1.0),  # Hendel et al. 2023: θ of each prompt replaces block L's output
    "elicit": ("prompt", "add", 2.0),  # ELICIT (Wang et al. 2025): h <- h + 2·θ
    "task_mean": ("task_mean", "replace", 1.0),  # one θ per task: the mean over the dev prompts' θ
    "function_vector": ("function_vector", "add", 1.0),  # Todd et al. 2024: the top heads' mean outputs, added
}
LAYER_CACHE = {"on": ("on", "true", "yes", "1"), "refresh": ("refresh",), "off": ("off", "false", "no", "0")}


@dataclass(frozen=True)
class Settings:
    """What hf-taskvec adds to HFLM's arguments, but the mode, which one model may change between runs (see
    ``TaskVectorLM`` for their meaning)."""

    layer: int | float | str = AUTO  # AUTO, a block index, or a fraction of depth; resolved by the model
    num_dummy: int = 2
    seed: int = 1234
    num_dev: int = 50
    layer_cache: str = "on"
    fewshot_delimiter: str | None = None
    layers_path: str | None = None
    theta_path: str | None = None
    method: str = "hendel"
    vector: str = "prompt"  # θ of each prompt (Hendel's), or one per task: the mean of the dev prompts' θ
    op: str = "replace"
    scale: float = 1.0  # op=add only: h <- h + scale·θ
    top_heads: int = 10  # vector=function_vector: attention heads summed into the function vector
    attn_out_path: str | None = None  # vector=function_vector: each block's attention output projection
    num_mean_prompts: int | None = None  # vector=function_vector: dev prompts the head means average (None: all)
    num_aie_prompts: int | None = None  # vector=function_vector: dev prompts the heads are ranked on (None: all)

    @property
    def parts(self) -> tuple[str, str, float]:
        """What decides a patch besides θ's prompts: (vector, op, scale); Hendel's is METHODS["hendel"]."""
        return self.vector, self.op, self.scale

    @classmethod
    def read(
        cls,
        layer=AUTO,
        num_dummy=2,
        seed=1234,
        num_dev=50,
        layer_cache="on",
        fewshot_delimiter=None,
        layers_path=None,
        theta_path=None,
        method="hendel",
        vector=None,
        op=None,
        scale=None,
        top_heads=10,
        attn_out_path=None,
        num_mean_prompts=None,
        num_aie_prompts=None,
    ) -> Settings:
        """Settings from model arguments as lm-eval passes them; raises ValueError naming a bad one."""
        method_parts = read_method(method, vector, op, scale)
        counts = {
            name: None if value is None else as_int(name, value, minimum=1)
            for name, value in (("num_mean_prompts", num_mean_prompts), ("num_aie_prompts", num_aie_prompts))
        }
        given = [f"{name}={value}" for name, value in counts.items() if value is not None]
        if given and method_parts["vector"] != "function_vector":
            raise ValueError(
                f"{', '.join(given)} counts the prompts of a function vector: use it with method=function_vector "
                f"(or vector=function_vector), or leave it out"
            )
        return cls(
            layer=parse_layer(layer),
            num_dummy=as_int("num_dummy", num_dummy, minimum=1),
            seed=as_int("seed", seed),
            num_dev=as_int("num_dev", num_dev, minimum=2),
            layer_cache=check_layer_cache(layer_cache),
            fewshot_delimiter=read_escapes(fewshot_delimiter) if fewshot_delimiter else None,
            layers_path=layers_path or None,
            theta_path=theta_path or None,
            **method_parts,
            top_heads=as_int("top_heads", top_heads, minimum=1),
            attn_out_path=attn_out_path or None,
            **counts,
        )


def read_method(method, vector=None, op=None, scale=None) -> dict:
    """The method's preset, with each part the user gives in its place; a combination that means nothing (a
    scale on a replaced state) is refused, naming the valid ones."""
    name = str(method).strip().lower()
    if name not in METHODS:
        raise ValueError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
    preset = dict(zip(("vector", "op", "scale"), METHODS[name]))
    for key, value, valid in (("vector", vector, VECTORS), ("op", op, OPS)):
        if value is not None:
            preset[key] = str(value).strip().lower()
            if preset[key] not in valid:
                raise ValueError(f"{key}={value!r} is unknown: use one of {', '.join(valid)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, str)):
            raise ValueError(f"scale={scale!r} must be a finite number")
        try:
            preset["scale"] = float(scale)
        except ValueError:
            preset["scale"] = math.nan
        if not math.isfinite(preset["scale"]):
            raise ValueError(f"scale={scale!r} must be a finite number")
    if preset["op"] == "replace" and preset["scale"] != 1.0:
        raise ValueError(
            f"scale={preset['scale']:g} with op=replace: a replaced state is θ itself, so scale applies to op=add "
            "only; use op=add (h <- h + scale·θ) or leave scale out"
        )
    return {"method": name, **preset}


def parse_layer(value, name: str = "layer") -> int | float | str:
    """``AUTO``, a block index (negative counts from the end) or a fraction of depth, not yet resolved
    against a model's depth (``layers.resolve_layer`` does that). ``name`` is how the caller spells the option."""
    shown = f"{name}{' ' if name.startswith('--') else '='}{value!r}"
    wrong = f"{shown} is not 'auto', a block index or a fraction of depth (e.g. 0.6)"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            raise ValueError(wrong) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(wrong)
    return value


def check_mode(mode) -> str:
    text = str(mode).strip().lower()
    if text not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    return text


def check_layer_cache(value) -> str:
    text = str(value).strip().lower()
    for setting, spellings in LAYER_CACHE.items():
        if text in spellings:
            return setting
    raise ValueError(f"layer_cache={value!r} is unknown: use on (read and write), refresh (sweep again, write) or off")


def as_int(name: str, value, minimum: int | None = None) -> int:
    """An integer model argument: lm-eval's CLI turns "2" into 2 but "-1" into -1.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r} must be an integer")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None
    if not number.is_integer() or (minimum is not None and number < minimum):
        raise ValueError(f"{name}={value!r} must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    return int(number)


def read_escapes(text: str) -> str:
    r"""The CLI passes "\n" as a backslash and an n: read Python escapes, keeping non-ASCII characters intact."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
