"""The comparison as Markdown (printed and compare.md), CSV and JSON."""

from __future__ import annotations

import csv
import io
import math

from lm_eval_taskvec.comparison.table import Comparison, Row, model_title, whole
from lm_eval_taskvec.stats import ALPHA

CSV_DIGITS = 4  # decimals in CSV files, and at least as many significant digits (p-values, small distances)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _metric_name(key: str | None) -> str:
    if key is None:
        return "—"
    metric, filter_name = key.split(",", 1)
    return metric if filter_name == "none" else key


def _layer_header(table: Comparison, label: str) -> str:
    return "layer" if len(table.layer_columns) == 1 else f"layer ({label})"


def _row_name(row: Row) -> str:
    name = f"**{row.name}**" if row.kind == "group" else row.name
    notes = f" [{','.join(map(str, row.notes))}]" if row.notes else ""
    return "- " * row.depth + name + notes


def _cell(cell: dict | None) -> str:
    if not cell or cell["value"] is None:
        return "—"
    text = _fmt(cell["value"])
    if cell["stderr"] is not None:
        text += f" ± {_fmt(cell['stderr'])}"
    if cell["secondary"] is not None:
        text += f" ({_fmt(cell['secondary'])})"
    return text


def markdown(table: Comparison) -> str:
    models = {model_title(c.run) for c in table.columns}
    lines = []
    if len(models) == 1:
        lines += [f"Model: `{models.pop()}`.", ""]
    lines += [
        "Each cell: the row's metric ± lm-eval's stderr; `paper_match` rows show `exact_match` in brackets. "
        f"`*`: p < {ALPHA} in a paired test over the same documents (exact McNemar for 0/1 scores, else a "
        "paired bootstrap; p-values in compare.json).",
        "",
    ]
    header = [
        "task",
        "metric",
        *(c.label for c in table.columns),
        *(p.name for p in table.pairs),
        *(_layer_header(table, label) for label in table.layer_columns),
        "n",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        metric = _metric_name(row.metric) + (f" ({_metric_name(row.secondary)})" if row.secondary else "")
        cells = [_row_name(row), metric, *(_cell(row.cells.get(c.label)) for c in table.columns)]
        for pair in table.pairs:
            derived = row.derived[pair.name]
            text = _fmt(derived["value"], signed=pair.kind == "diff")
            cells.append(text + ("*" if derived["significant"] and derived["value"] is not None else ""))
        cells += [row.layers.get(label, "") for label in table.layer_columns]
        cells.append("" if row.n is None else str(row.n))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns:"]
    for column in table.columns:
        run = column.run
        files = ", ".join(f"`{r.path}`" for r in column.runs)
        lines.append(f"- `{column.label}`: {run.model_type} `{run.model_name}`, limit {whole(run.limit)}; {files}")
    if table.footnotes:
        lines += ["", "Notes:"]
        lines += [f"{i}. {text}" for i, text in enumerate(table.footnotes, 1)]
    return "\n".join(lines) + "\n"


def to_csv(table: Comparison) -> str:
    """One line per row; numbers rounded by ``csv_number``; p-values of the pairs beside their values."""
    header = ["task", "kind", "depth", "metric", "secondary_metric"]
    for column in table.columns:
        header += [column.label, f"{column.label} stderr", f"{column.label} secondary", f"{column.label} n"]
    for pair in table.pairs:
        header += [pair.name, f"{pair.name} p"]
    header += [_layer_header(table, label) for label in table.layer_columns] + ["n", "notes"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        line = [row.name, row.kind, row.depth, row.metric or "", row.secondary or ""]
        for column in table.columns:
            cell = row.cells.get(column.label) or {}
            line += [_blank(cell.get(k)) for k in ("value", "stderr", "secondary", "n")]
        for pair in table.pairs:
            line += [_blank(row.derived[pair.name]["value"]), _blank(row.derived[pair.name]["p"])]
        line += [row.layers.get(label, "") for label in table.layer_columns]
        line += [_blank(row.n), " ".join(map(str, row.notes))]
        writer.writerow(line)
    return out.getvalue()


def _blank(value) -> str:
    return "" if value is None else csv_number(value)


def csv_number(value):
    """A float rounded to CSV_DIGITS decimals, or to CSV_DIGITS significant digits where that keeps more
    (p = 0.0003906, not 0.0004), as text: 0.4, not 0.39999999999999997. Anything else as ``str`` gives it."""
    if not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return str(value)
    digits = max(CSV_DIGITS, CSV_DIGITS - 1 - math.floor(math.log10(abs(value))))
    return str(round(float(value), digits))  # float(): numpy's floats would print as np.float64(0.4)


def to_json(table: Comparison) -> dict:
    return {
        "alpha": ALPHA,
        "columns": [c.describe() for c in table.columns],
        "pairs": [p.describe() for p in table.pairs],
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "depth": r.depth,
                "metric": r.metric,
                "secondary_metric": r.secondary,
                "cells": r.cells,
                "derived": r.derived,
                "tests": r.tests,
                "layers": r.layers,
                "n": r.n,
                "notes": r.notes,
            }
            for r in table.rows
        ],
        "footnotes": table.footnotes,
    }
