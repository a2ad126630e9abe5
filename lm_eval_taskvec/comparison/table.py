"""The comparison table: rows are tasks and groups, columns are runs; then H/R, H−B (or any pair of
columns) with paired tests, the chosen layer and n. Differences that make cells incomparable are footnoted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_taskvec.comparison.runs import RUNTIME_ARGS, Run, UsageError
from lm_eval_taskvec.stats import ALPHA, paired_scores, paired_test

MODE_ORDER = {"baseline": 0, "hypothesis": 1, "regular": 2}  # the paper's B, H, R
PAPER_METRIC, STRICT_METRIC = "paper_match", "exact_match"
MODEL_KEYS = ("pretrained", "model", "path", "engine")
FAMILY_FREE = ("mode", "layer", "method", "vector", "op", "scale")  # what hf-taskvec runs of one family differ in
CHECKED = ("version", "n-shot", "n", "generation_kwargs")  # per-task settings that must agree across columns


@dataclass
class Column:
    """One run, or several runs of the same model and settings that cover different tasks."""

    label: str
    runs: list[Run]

    @property
    def run(self) -> Run:
        return self.runs[0]

    def run_for(self, name: str) -> Run | None:
        return next((r for r in self.runs if name in r.results), None)

    def describe(self) -> dict:
        run = self.run
        return {
            "label": self.label,
            "model": run.model_name,
            "model_type": run.model_type,
            "mode": run.mode,
            "model_args": run.model_args,
            "limit": whole(run.limit),
            "gen_kwargs": run.settings["gen_kwargs"],
            "taskvec": {k: v for k, v in run.taskvec.items() if k != "layer_selection"} or None,
            "files": [str(r.path) for r in self.runs],
        }


@dataclass
class Pair:
    """Two columns compared document by document; ``kind`` is how the table shows it (a/b or a−b)."""

    name: str
    a: Column
    b: Column
    kind: str  # "ratio" or "diff"

    def describe(self) -> dict:
        return {"name": self.name, "a": self.a.label, "b": self.b.label, "kind": self.kind}


@dataclass
class Row:
    name: str
    kind: str  # "task" or "group"
    depth: int
    leaves: list[str]
    metric: str | None = None  # "metric,filter" key of lm-eval's results
    secondary: str | None = None
    cells: dict = field(default_factory=dict)  # column label -> {"value", "stderr", "secondary", "n"} or None
    derived: dict = field(default_factory=dict)  # pair name -> {"value", "p", "significant"}
    tests: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # hypothesis column label -> "18" or "18-22"
    n: int | None = None
    notes: list = field(default_factory=list)


@dataclass
class Comparison:
    columns: list[Column]
    pairs: list[Pair]
    rows: list[Row]
    footnotes: list[str]
    layer_columns: list[str]

    def note(self, row: Row | None, text: str) -> None:
        if text not in self.footnotes:
            self.footnotes.append(text)
        number = self.footnotes.index(text) + 1
        if row is not None and number not in row.notes:
            row.notes.append(number)


def build(runs: list[Run], pairs=None, metric: str | None = None, iters: int = 10_000, seed: int = 1234) -> Comparison:
    """The table for ``runs``: ``pairs`` are (a, b) column labels or 1-based column numbers (default: H vs R
    and H vs B per hf-taskvec model, or every column vs the first); ``metric`` overrides the headline metric."""
    columns = make_columns(runs)
    table = Comparison(columns, [], make_rows(runs), [], [])
    table.pairs = choose_pairs(columns, pairs)
    table.layer_columns = [c.label for c in columns if c.run.mode == "hypothesis"]
    _note_column_settings(table)
    for row in table.rows:
        fill_row(table, row, metric)
        for pair in table.pairs:
            fill_pair(table, row, pair, iters, seed)
    return table


# ---------------------------------------------------------------------------------------------- columns
def make_columns(runs: list[Run]) -> list[Column]:
    """Runs with equal settings and disjoint tasks share a column; anything else gets a column of its own."""
    columns: list[Column] = []
    keys: list[str] = []
    for run in runs:
        key = json.dumps(run.settings, sort_keys=True, default=str)
        home = next(
            (
                c
                for c, k in zip(columns, keys)
                if k == key and not any(set(run.results) & set(r.results) for r in c.runs)
            ),
            None,
        )
        if home is None:
            columns.append(Column("", [run]))
            keys.append(key)
        else:
            home.runs.append(run)
    order = {id(c): _column_order(c, columns) for c in columns}
    columns.sort(key=lambda c: order[id(c)])
    for column, label in zip(columns, _labels(columns)):
        column.label = label
    return columns


def _family(run: Run) -> str:
    """hf-taskvec runs of one model and settings, whatever their mode: the columns H/R and H−B relate."""
    settings = dict(run.settings)
    settings["model_args"] = {k: v for k, v in settings["model_args"].items() if k not in FAMILY_FREE}
    return json.dumps(settings, sort_keys=True, default=str)


def _column_order(column: Column, columns: list[Column]) -> tuple:
    """Input order, except that the modes of one model sit together as B, H, R."""
    run = column.run
    if run.mode is None:
        return (columns.index(column), 0)
    first = next(i for i, c in enumerate(columns) if c.run.mode and _family(c.run) == _family(run))
    return (first, MODE_ORDER.get(run.mode, 3))


def _method(run: Run, named: bool = False) -> str:
    """The mode (``named``: and the method, as ``config.taskvec`` records it) and fixed layer of hf-taskvec runs,
    the steering file of steered runs, else the model type."""
    if run.mode:
        layer = run.taskvec.get("layer", run.model_args.get("layer"))
        method = f" {run.taskvec.get('method', 'hendel')}" if named and run.mode == "hypothesis" else ""
        return run.mode + method + (f" L{layer}" if run.mode == "hypothesis" and layer not in (None, "auto") else "")
    if run.model_type == "steered" and "steer_path" in run.model_args:
        return f"steered {Path(str(run.model_args['steer_path'])).name}"
    return run.model_type


def _labels(columns: list[Column]) -> list[str]:
    """Model name (when the columns hold several) and method; then whatever setting tells equal labels apart."""
    models = {c.run.model_name for c in columns}
    named = len({_hypothesis_method(c.run) for c in columns} - {None}) > 1  # columns of several methods
    labels = [(f"{_short(c.run.model_name)} " if len(models) > 1 else "") + _method(c.run, named) for c in columns]
    for label in set(labels):
        same = [i for i, text in enumerate(labels) if text == label]
        if len(same) < 2:
            continue
        described = [_flat(columns[i].run) for i in same]
        keys = sorted({k for d in described for k in d if len({str(e.get(k)) for e in described}) > 1})
        for i, d in zip(same, described):
            labels[i] = " ".join([label, *(f"{k}={d.get(k)}" for k in keys)])
    for label in set(labels):
        same = [i for i, text in enumerate(labels) if text == label]
        if len(same) > 1:
            for number, i in enumerate(same, 1):
                labels[i] = f"{label} #{number}"
    return labels


def _hypothesis_method(run: Run) -> str | None:
    return run.taskvec.get("method", "hendel") if run.mode == "hypothesis" else None


def whole(limit):
    """lm-eval stores ``--limit 10`` as 10.0: a whole number as an int (shown "10"), a fraction or None as is."""
    return int(limit) if isinstance(limit, float) and limit.is_integer() else limit


def model_title(run: Run) -> str:
    """The model as a reader knows it: the embedded model's real name ("HuggingFaceTB/SmolLM2-135M-Instruct
    (embedded)", from the results' ``config.embedded_model``), else the run's model name."""
    embedded = run.config.get("embedded_model")
    if isinstance(embedded, dict) and embedded.get("model"):
        return f"{embedded['model']} (embedded)"
    return run.model_name


def _short(model_name: str) -> str:
    return Path(model_name.rstrip("/")).name or model_name


def _flat(run: Run) -> dict:
    args = {k: v for k, v in run.model_args.items() if k not in RUNTIME_ARGS and k not in MODEL_KEYS}
    return args | {
        "limit": whole(run.limit),
        "gen_kwargs": run.settings["gen_kwargs"] or None,
        "fewshot_seed": run.settings["fewshot_seed"],
    }


def _note_column_settings(table: Comparison) -> None:
    limits = {c.label: whole(c.run.limit) for c in table.columns}
    if len({str(v) for v in limits.values()}) > 1:
        table.note(
            None,
            "limit differs between columns: "
            + ", ".join(f"{k} {v}" for k, v in limits.items())
            + "; rows whose n differ are flagged",
        )
    seen: dict[str, Column] = {}
    for column in table.columns:
        key = json.dumps(column.run.settings, sort_keys=True, default=str)
        if key in seen:
            table.note(
                None,
                f"`{seen[key].label}` and `{column.label}` are runs with the same settings and "
                "overlapping tasks: kept as separate columns, never merged",
            )
        seen.setdefault(key, column)


# ---------------------------------------------------------------------------------------------- pairs
def choose_pairs(columns: list[Column], wanted=None) -> list[Pair]:
    if wanted is not None:
        return [_user_pair(columns, a, b) for a, b in wanted]
    pairs = []
    hypotheses = [c for c in columns if c.run.mode == "hypothesis"]
    for h in hypotheses:
        family = [c for c in columns if c.run.mode and _family(c.run) == _family(h.run)]
        prefix = "" if len(hypotheses) == 1 else f"{h.label}: "
        for mode, kind, name in (("regular", "ratio", "H/R"), ("baseline", "diff", "H−B")):
            others = [c for c in family if c.run.mode == mode]
            if len(others) == 1:
                pairs.append(Pair(prefix + name, h, others[0], kind))
    if not pairs and len(columns) > 1:  # other methods: each against the first column
        pairs = [Pair(f"{c.label} − {columns[0].label}", c, columns[0], "diff") for c in columns[1:]]
    return pairs


def _user_pair(columns: list[Column], a, b) -> Pair:
    def find(ref) -> Column:
        text = str(ref).strip()
        if text.isdigit() and 1 <= int(text) <= len(columns):
            return columns[int(text) - 1]
        for column in columns:
            if column.label == text:
                return column
        raise UsageError(
            f"pairs: no column {ref!r}; give a column label or number 1-{len(columns)} of {[c.label for c in columns]}"
        )

    ca, cb = find(a), find(b)
    return Pair(f"{ca.label} − {cb.label}", ca, cb, "diff")


# ---------------------------------------------------------------------------------------------- rows
def make_rows(runs: list[Run]) -> list[Row]:
    """Groups with their tasks beneath them (lm-eval's own hierarchy), then tasks outside any group."""
    subtasks: dict[str, list[str]] = {}
    present: list[str] = []
    for run in runs:
        for group, members in (run.data.get("group_subtasks") or {}).items():
            if members:
                known = subtasks.setdefault(group, [])
                known += [m for m in members if m not in known]
        present += [name for name in run.results if name not in present]
    children = {m for members in subtasks.values() for m in members}
    roots = [n for n in present if n in subtasks and n not in children]
    roots += [n for n in present if n not in subtasks and n not in children]

    def leaves(name: str) -> list[str]:
        if name not in subtasks:
            return [name]
        return [leaf for m in subtasks[name] for leaf in leaves(m)]

    rows: list[Row] = []

    def add(name: str, depth: int) -> None:
        if name not in present:
            return
        rows.append(Row(name, "group" if name in subtasks else "task", depth, leaves(name)))
        for member in subtasks.get(name, []):
            add(member, depth + 1)

    for root in roots:
        add(root, 0)
    return rows


def _metric_keys(entry: dict) -> list[str]:
    return [k for k in entry if "," in k and "_stderr," not in k and not k.startswith("sample")]


def _headline(entries: list[dict], metric: str | None) -> tuple[str | None, str | None]:
    """``paper_match`` (with ``exact_match`` beside it) where a task has it, else ``metric`` when given,
    else lm-eval's first metric of the task."""
    keys = [k for e in entries for k in _metric_keys(e)]
    keys = list(dict.fromkeys(keys))
    if metric:
        chosen = [k for k in keys if k.split(",", 1)[0] == metric]
        if chosen:
            return chosen[0], None
    paper = [k for k in keys if k.split(",", 1)[0] == PAPER_METRIC]
    if paper:
        strict = f"{STRICT_METRIC},{paper[0].split(',', 1)[1]}"
        return paper[0], strict if strict in keys else None
    return (keys[0] if keys else None), None


def fill_row(table: Comparison, row: Row, metric: str | None) -> None:
    """Cells of every column, n, layers, and footnotes where columns are not comparable."""
    entries = {c.label: c.run_for(row.name).results[row.name] for c in table.columns if c.run_for(row.name)}
    row.metric, row.secondary = _headline(list(entries.values()), metric)
    for column in table.columns:
        entry = entries.get(column.label)
        if entry is None or row.metric is None:
            row.cells[column.label] = None
            continue
        if row.metric not in entry:
            row.cells[column.label] = None
            table.note(
                row,
                f"`{column.label}` has no {row.metric} for {row.name} (it reports "
                f"{', '.join(_metric_keys(entry)) or 'nothing'}): left empty",
            )
            continue
        row.cells[column.label] = {
            "value": _number(entry.get(row.metric)),
            "stderr": _number(entry.get(row.metric.replace(",", "_stderr,", 1))),
            "secondary": _number(entry.get(row.secondary)) if row.secondary else None,
            "n": _n(column, row),
        }
    _check_settings(table, row)
    ns = {cell["n"] for cell in row.cells.values() if cell and cell["n"] is not None}
    row.n = ns.pop() if len(ns) == 1 else None
    for label in table.layer_columns:
        column = next(c for c in table.columns if c.label == label)
        layers = sorted({layer for leaf in row.leaves if (r := column.run_for(leaf)) for layer in r.layers(leaf)})
        if len(layers) == 1 or (layers and row.kind == "task"):  # a task: every block used; a group: their range
            row.layers[label] = ", ".join(map(str, layers))
        elif layers:
            row.layers[label] = f"{layers[0]}-{layers[-1]}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _n(column: Column, row: Row) -> int | None:
    """Documents scored: lm-eval's effective n-samples, summed over a group's tasks."""
    counts = []
    for leaf in row.leaves:
        run = column.run_for(leaf)
        count = run.task_info(leaf)["n"] if run else None
        if count is None:
            return None
        counts.append(int(count))
    return sum(counts)


def _check_settings(table: Comparison, row: Row) -> None:
    """Footnote every per-task setting (version, n-shot, n, generation settings) that differs across columns."""
    infos = {}
    for column in table.columns:
        run = column.run_for(row.name)
        if run and row.cells.get(column.label):
            info = run.task_info(row.name)
            info["n"] = row.cells[column.label]["n"]
            infos[column.label] = info
    for key in CHECKED:
        values = {label: info.get(key) for label, info in infos.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            shown = ", ".join(f"{label} {json.dumps(v, default=str)}" for label, v in values.items())
            table.note(row, f"{key} differs: {shown}")


# ---------------------------------------------------------------------------------------------- pairs per row
def fill_pair(table: Comparison, row: Row, pair: Pair, iters: int, seed: int) -> None:
    a, b = row.cells.get(pair.a.label), row.cells.get(pair.b.label)
    tests = {}
    for key in filter(None, (row.metric, row.secondary)):
        test = _row_test(table, row, pair, key, iters, seed)
        row.tests.append({"pair": pair.name, "a": pair.a.label, "b": pair.b.label, "metric": key} | test)
        tests[key] = test
    value = None
    if a and b and a["value"] is not None and b["value"] is not None:
        if pair.kind == "diff":
            value = a["value"] - b["value"]
        elif b["value"]:
            value = a["value"] / b["value"]
    p = tests.get(row.metric, {}).get("p")
    row.derived[pair.name] = {"value": value, "p": p, "significant": p is not None and p < ALPHA}


def _row_test(table: Comparison, row: Row, pair: Pair, key: str, iters: int, seed: int) -> dict:
    """The paired test of ``key`` over a row's documents (a group pools its tasks' documents)."""
    metric, filter_name = key.split(",", 1)
    a_scores, b_scores, unmatched = [], [], 0
    for leaf in row.leaves:
        runs = pair.a.run_for(leaf), pair.b.run_for(leaf)
        if None in runs:
            return {"p": None, "reason": f"{leaf} is missing from a column"}
        samples = [r.samples(leaf) for r in runs]
        if None in samples:
            return {"p": None, "reason": f"no samples logged for {leaf} (run lm_eval with --log_samples)"}
        scores = paired_scores(*samples, metric, filter_name)
        if scores is None:
            return {"p": None, "reason": f"{metric} of {leaf} is not a per-document number"}
        a_scores += scores[0]
        b_scores += scores[1]
        if scores[2]:
            unmatched += scores[2]
            table.note(
                row if row.name == leaf else None,
                f"{leaf}: {scores[2]} documents with the same doc_id differ in content (doc_hash) between "
                f"`{pair.a.label}` and `{pair.b.label}`: not paired",
            )
    if not a_scores:
        return {"p": None, "reason": "no document scored by both columns"}
    return paired_test(a_scores, b_scores, iters, seed) | {"unmatched": unmatched}
