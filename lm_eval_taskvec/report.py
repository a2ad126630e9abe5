"""What the plugin reports about layer choices: rounded dev curves, the accuracy-by-layer table and the sweep plot."""

from __future__ import annotations

DIGITS = 4  # dev accuracies are k/n over at most a few hundred documents


def rounded(choices: dict[str, dict]) -> dict[str, dict]:
    """Layer choices with every float rounded: float32 means otherwise print as 0.07692307978868484."""
    return {task: {key: _round(value) for key, value in choice.items()} for task, choice in choices.items()}


def _round(value):
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value
