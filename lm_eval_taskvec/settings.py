"""hf-taskvec's own model arguments, parsed and checked in one place, without torch.

lm-eval's CLI parses ``--model_args`` loosely (``layer=3`` is an int, ``layer=-1`` the float -1.0, ``0.6`` a
float, ``true`` a bool), and the Python API passes anything: every argument is read here, once, and bad input
gets a message naming the argument and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("regular", "hypothesis", "baseline")
AUTO = "auto"
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
    ) -> Settings:
        """Settings from model arguments as lm-eval passes them; raises ValueError naming a bad one."""
        return cls(
            layer=parse_layer(layer),
            num_dummy=as_int("num_dummy", num_dummy, minimum=1),
            seed=as_int("seed", seed),
            num_dev=as_int("num_dev", num_dev, minimum=2),
            layer_cache=check_layer_cache(layer_cache),
            fewshot_delimiter=read_escapes(fewshot_delimiter) if fewshot_delimiter else None,
            layers_path=layers_path or None,
            theta_path=theta_path or None,
        )


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
