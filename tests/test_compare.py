"""``taskvec compare`` on synthetic lm-eval results files: columns, rows, footnotes, paired tests, outputs, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import subprocess
import sys

import pytest

import lm_eval_taskvec
from lm_eval_taskvec.comparison import ResultsPathError, UsageError, build, compare, load_runs
from lm_eval_taskvec.comparison.render import markdown, to_csv
from lm_eval_taskvec.stats import mcnemar_exact, paired_bootstrap, paired_test

MODEL = "org/tiny-model"


def _stderr(scores: list[float]) -> float:
    n = len(scores)
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def write_run(
    folder,
    scores: dict,
    *,
    model="hf-taskvec",
    mode="hypothesis",
    groups=None,
    limit=None,
    nshot=5,
    versions=None,
    layers=None,
    extra_args=None,
    log_samples=True,
    hashes=None,
    date="2025-01-01T00-00-00.1",
    group_values=None,
):
    """A results file (and samples files) laid out as ``lm_eval --output_path`` writes them.

    ``scores``: task -> metric -> per-document scores; ``groups``: group -> member tasks, with the group's
    aggregate taken from ``group_values`` (lm-eval's own number, which the table must show as is).
    """
    folder.mkdir(parents=True, exist_ok=True)
    args = {"pretrained": MODEL} | ({"mode": mode} if model == "hf-taskvec" else {}) | (extra_args or {})
    results, configs, n_samples = {}, {}, {}
    for task, metrics in scores.items():
        n = len(next(iter(metrics.values())))
        results[task] = {"name": task, "alias": task, "sample_len": n}
        for metric, values in metrics.items():
            results[task][f"{metric},none"] = sum(values) / n
            results[task][f"{metric}_stderr,none"] = _stderr(values)
        configs[task] = {
            "task": task,
            "num_fewshot": nshot if isinstance(nshot, int) else nshot[task],
            "metric_list": [{"metric": m} for m in metrics],
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16},
        }
        n_samples[task] = {"original": 100, "effective": n}
        if log_samples:
            lines = []
            for doc_id in range(n):
                doc_hash = (hashes or {}).get((task, doc_id)) or hashlib.sha256(f"{task}{doc_id}".encode()).hexdigest()
                lines.append(
                    json.dumps(
                        {
                            "doc_id": doc_id,
                            "doc": {"input": str(doc_id)},
                            "target": "x",
                            "filter": "none",
                            "metrics": list(metrics),
                            "doc_hash": doc_hash,
                            **{m: v[doc_id] for m, v in metrics.items()},
                        }
                    )
                )
            (folder / f"samples_{task}_{date}.jsonl").write_text("\n".join(lines) + "\n")
    for group, value in (group_values or {}).items():
        results[group] = {"name": group, "alias": group, "sample_len": 0} | value
    config = {
        "model": model,
        "model_args": args,
        "batch_size": "4",
        "device": "cpu",
        "limit": limit,
        "gen_kwargs": {},
        "random_seed": 0,
        "numpy_seed": 1234,
        "torch_seed": 1234,
        "fewshot_seed": 1234,
    }
    if model == "hf-taskvec":
        selection = {t: {"layer": layer, "dev_accuracy": []} for t, layer in (layers or {}).items()}
        config["taskvec"] = {
            "mode": mode,
            "layer": "auto" if mode == "hypothesis" else None,
            "num_dummy": 2,
            "layer_selection": selection,
        }
    versions = versions or {}
    data = {
        "results": results,
        "groups": {g: results[g] for g in group_values or {}},
        "group_subtasks": {g: list(m) for g, m in (groups or {}).items()},
        "configs": configs,
        "versions": {t: versions.get(t, 1.0) for t in results},
        "n-shot": {t: configs.get(t, {}).get("num_fewshot", 5) for t in results},
        "n-samples": n_samples,
        "config": config,
        "model_source": model,
        "model_name": MODEL,
        "lm_eval_version": "0.4.13",
    }
    path = folder / f"results_{date}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


H = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # hypothesis right on documents 0-8
B = [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # baseline right on 0 and 9: H alone 8 times, B alone once
R = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # regular: H alone 0 times, R alone once


def three_modes(tmp_path, **kwargs):
    runs = {}
    for mode, paper in (("regular", R), ("hypothesis", H), ("baseline", B)):
        exact = [0] * len(paper) if mode != "regular" else paper
        runs[mode] = write_run(
            tmp_path / mode,
            {"tv_a": {"paper_match": paper, "exact_match": exact}},
            mode=mode,
            layers={"tv_a": 7} if mode == "hypothesis" else None,
            **kwargs,
        )
    return runs


def test_exact_mcnemar_matches_the_hand_computed_binomial_tail():
    # 8 vs 1 discordant documents: p = 2 * (C(9,0) + C(9,1)) / 2**9 = 20 / 512
    assert mcnemar_exact(8, 1) == mcnemar_exact(1, 8) == 20 / 512
    assert mcnemar_exact(3, 3) == 1.0  # the doubled tail is capped
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == 2 / 64


@pytest.mark.parametrize("a_only, b_only", [(2600, 2400), (30, 50), (100, 3), (0, 7), (4, 4)])
def test_exact_mcnemar_agrees_with_scipys_binomial_test(a_only, b_only):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12)


def test_paired_bootstrap_against_hand_computed_cases():
    # every document differs by the same amount: no resample comes as close to the null as zero
    assert paired_bootstrap([0.7] * 5, [0.2] * 5, iters=999, seed=1) == 1 / 1000
    # d = (1, 0): resampled means 0, .5, 1 with probabilities 1/4, 1/2, 1/4; |mean - .5| >= .5 half the time
    assert paired_bootstrap([1.0, 0.5], [0.0, 0.5], iters=20_000, seed=3) == pytest.approx(0.5, abs=0.02)
    assert paired_bootstrap([0.3, 0.6], [0.3, 0.6]) == 1.0
    first = paired_bootstrap([0.1, 0.9, 0.4, 0.8], [0.2, 0.3, 0.5, 0.1], seed=7)
    assert first == paired_bootstrap([0.1, 0.9, 0.4, 0.8], [0.2, 0.3, 0.5, 0.1], seed=7)  # seeded


def test_paired_test_chooses_mcnemar_for_0_1_scores_only():
    assert paired_test(H, B)["test"] == "mcnemar_exact"
    assert paired_test(H, B) == {"test": "mcnemar_exact", "n": 10, "diff": 0.7, "a_only": 8, "b_only": 1, "p": 20 / 512}
    assert paired_test([0.5, 1.0], [0.0, 1.0])["test"] == "paired_bootstrap"


def test_modes_of_one_model_become_b_h_r_with_ratio_difference_layer_and_n(tmp_path):
    runs = three_modes(tmp_path)
    table = build(load_runs([runs["regular"], runs["hypothesis"], runs["baseline"]]))
    assert [c.label for c in table.columns] == ["baseline", "hypothesis", "regular"]
    assert [p.name for p in table.pairs] == ["H/R", "H−B"]
    (row,) = table.rows
    assert (row.metric, row.secondary) == ("paper_match,none", "exact_match,none")
    assert row.cells["hypothesis"]["value"] == pytest.approx(0.9)
    assert row.cells["hypothesis"]["stderr"] == pytest.approx(0.1)  # sample variance 0.1, over n = 10
    assert row.derived["H/R"]["value"] == pytest.approx(0.9)
    assert row.derived["H−B"]["value"] == pytest.approx(0.7)
    assert row.layers == {"hypothesis": "7"} and row.n == 10
    line = next(line for line in markdown(table).splitlines() if line.startswith("| tv_a"))
    assert line == (
        "| tv_a | paper_match (exact_match) | 0.20 ± 0.13 (0.00) | 0.90 ± 0.10 (0.00) | "
        "1.00 ± 0.00 (1.00) | 0.90 | +0.70* | 7 | 10 |"
    )


def test_significance_marks_and_p_values(tmp_path):
    runs = three_modes(tmp_path)
    table = build(load_runs(list(runs.values())))
    (row,) = table.rows
    hb = next(t for t in row.tests if t["pair"] == "H−B" and t["metric"] == "paper_match,none")
    assert (hb["test"], hb["a_only"], hb["b_only"], hb["n"], hb["p"]) == ("mcnemar_exact", 8, 1, 10, 20 / 512)
    assert row.derived["H−B"] == {"value": pytest.approx(0.7), "p": 20 / 512, "significant": True}
    hr = next(t for t in row.tests if t["pair"] == "H/R" and t["metric"] == "paper_match,none")
    assert (hr["a_only"], hr["b_only"], hr["p"]) == (0, 1, 1.0)
    assert row.derived["H/R"]["significant"] is False
    strict = next(t for t in row.tests if t["pair"] == "H/R" and t["metric"] == "exact_match,none")
    assert (strict["a_only"], strict["b_only"], strict["p"]) == (0, 10, 2 / 1024)


def test_documents_pair_by_doc_id_and_doc_hash(tmp_path):
    runs = three_modes(tmp_path / "ok")
    other = write_run(
        tmp_path / "b",
        {"tv_a": {"paper_match": B, "exact_match": [0] * 10}},
        mode="baseline",
        hashes={("tv_a", 0): "changed"},
    )
    table = build(load_runs([runs["hypothesis"], other]))
    hb = next(t for t in table.rows[0].tests if t["metric"] == "paper_match,none")
    assert (hb["n"], hb["unmatched"], hb["a_only"], hb["b_only"]) == (9, 1, 8, 1)  # doc 0 (both right) left out
    assert any("1 documents with the same doc_id differ in content" in f for f in table.footnotes)


def test_no_samples_no_test_and_no_mark(tmp_path):
    runs = three_modes(tmp_path, log_samples=False)
    table = build(load_runs(list(runs.values())))
    row = table.rows[0]
    assert row.derived["H−B"] == {"value": pytest.approx(0.7), "p": None, "significant": False}
    assert "--log_samples" in row.tests[0]["reason"]
    assert "| +0.70 |" in markdown(table)


def test_groups_show_lm_evals_own_aggregate_above_their_tasks(tmp_path):
    scores = {"tv_a": {"paper_match": H}, "tv_b": {"paper_match": B}, "solo": {"acc": [1, 0, 0, 0]}}
    group = {"paper_match,none": 0.37, "paper_match_stderr,none": 0.04}  # not the plain mean 0.55: the file's
    path = write_run(tmp_path, scores, groups={"tv_g": ["tv_a", "tv_b"]}, group_values={"tv_g": group})
    table = build(load_runs([path]))
    assert [(r.name, r.kind, r.depth) for r in table.rows] == [
        ("tv_g", "group", 0),
        ("tv_a", "task", 1),
        ("tv_b", "task", 1),
        ("solo", "task", 0),
    ]
    g = table.rows[0]
    assert (g.cells["hypothesis"]["value"], g.cells["hypothesis"]["stderr"], g.n) == (0.37, 0.04, 20)
    assert g.leaves == ["tv_a", "tv_b"]
    assert table.rows[3].metric == "acc,none"  # lm-eval's first metric where there is no paper_match
    text = markdown(table)
    assert "| **tv_g** | paper_match | 0.37 ± 0.04 |" in text and "| - tv_a | paper_match | 0.90 ± 0.10 |" in text


def test_group_test_pools_the_documents_of_its_tasks(tmp_path):
    scores = {"hypothesis": {"tv_a": H, "tv_b": H}, "baseline": {"tv_a": B, "tv_b": [0] * 10}}
    paths = [
        write_run(
            tmp_path / m,
            {t: {"paper_match": s} for t, s in by_task.items()},
            mode=m,
            groups={"tv_g": ["tv_a", "tv_b"]},
            group_values={"tv_g": {"paper_match,none": 0.5}},
        )
        for m, by_task in scores.items()
    ]
    table = build(load_runs(paths))
    test = table.rows[0].tests[0]
    assert (test["n"], test["a_only"], test["b_only"]) == (20, 8 + 9, 1)
    assert test["p"] == mcnemar_exact(17, 1)


def test_headline_metric_override_and_missing_metric_footnote(tmp_path):
    a = write_run(tmp_path / "a", {"arc": {"acc": [1, 0, 1, 1], "acc_norm": [1, 1, 1, 1]}}, model="hf", mode=None)
    b = write_run(tmp_path / "b", {"arc": {"acc": [0, 0, 1, 1]}}, model="vllm", mode=None)
    table = build(load_runs([a, b]), metric="acc_norm")
    row = table.rows[0]
    assert row.metric == "acc_norm,none" and row.cells["hf"]["value"] == 1.0
    assert row.cells["vllm"] is None
    assert table.footnotes == ["`vllm` has no acc_norm,none for arc (it reports acc,none): left empty"]
    assert row.notes == [1]
    assert [p.name for p in table.pairs] == ["vllm − hf"]  # other methods: each column against the first


def test_runs_that_differ_in_nshot_version_or_limit_are_flagged_never_merged(tmp_path):
    a = write_run(tmp_path / "a", {"tv_a": {"paper_match": H}, "tv_b": {"paper_match": H}}, limit=10)
    b = write_run(
        tmp_path / "b",
        {"tv_a": {"paper_match": H[:5]}, "tv_b": {"paper_match": H}},
        nshot={"tv_a": 5, "tv_b": 3},
        versions={"tv_a": 2.0},
        limit=None,
    )
    table = build(load_runs([a, b]))
    assert [c.label for c in table.columns] == ["hypothesis limit=10", "hypothesis limit=None"]
    rows = {r.name: r for r in table.rows}
    notes = {r: [table.footnotes[i - 1] for i in rows[r].notes] for r in rows}
    assert notes["tv_a"] == [
        'version differs: hypothesis limit=10 "1.0", hypothesis limit=None "2.0"',
        "n differs: hypothesis limit=10 10, hypothesis limit=None 5",
    ]
    assert notes["tv_b"] == ["n-shot differs: hypothesis limit=10 5, hypothesis limit=None 3"]
    assert table.footnotes[0].startswith("limit differs between columns")
    assert rows["tv_a"].n is None and rows["tv_b"].n == 10


def test_runs_of_one_setting_share_a_column_only_when_their_tasks_differ(tmp_path):
    a = write_run(tmp_path / "a", {"tv_a": {"paper_match": H}}, date="2025-01-01T00-00-00.1")
    b = write_run(tmp_path / "b", {"tv_b": {"paper_match": B}}, date="2025-01-02T00-00-00.1")
    merged = build(load_runs([a, b]))
    assert [(c.label, len(c.runs)) for c in merged.columns] == [("hypothesis", 2)]
    assert [r.cells["hypothesis"]["value"] for r in merged.rows] == [pytest.approx(0.9), pytest.approx(0.2)]
    c = write_run(tmp_path / "c", {"tv_a": {"paper_match": B}})
    kept = build(load_runs([a, c]))
    assert [c.label for c in kept.columns] == ["hypothesis #1", "hypothesis #2"]
    assert "kept as separate columns, never merged" in kept.footnotes[0]


def test_labels_name_model_fixed_layer_and_steering_file(tmp_path):
    a = write_run(tmp_path / "a", {"t": {"acc": [1, 0]}}, extra_args={"layer": 12})
    b = write_run(
        tmp_path / "b",
        {"t": {"acc": [1, 0]}},
        model="steered",
        mode=None,
        extra_args={"steer_path": "/vectors/happy.pt"},
    )
    other = write_run(tmp_path / "c", {"t": {"acc": [1, 0]}}, model="hf", mode=None)
    data = json.loads(other.read_text())
    data["config"]["model_args"] = "pretrained=org/other-model,dtype=float32"  # Python API: a string
    other.write_text(json.dumps(data))
    data = json.loads(a.read_text())
    data["config"]["taskvec"]["layer"] = 12
    a.write_text(json.dumps(data))
    table = build(load_runs([a, b, other]))
    assert [c.label for c in table.columns] == [
        "tiny-model hypothesis L12",
        "tiny-model steered happy.pt",
        "other-model hf",
    ]


def test_user_pairs_by_label_or_number(tmp_path):
    runs = three_modes(tmp_path)
    table = build(load_runs(list(runs.values())), pairs=[("regular", "1")])
    assert [(p.name, p.a.label, p.b.label) for p in table.pairs] == [("regular − baseline", "regular", "baseline")]
    with pytest.raises(UsageError, match="pairs: no column 'nope'; give a column label or number 1-3"):
        build(load_runs(list(runs.values())), pairs=[("nope", "1")])


def test_outputs_md_csv_json_png(tmp_path):
    runs = three_modes(tmp_path / "runs")
    table = compare([tmp_path / "runs"], tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "compare.md").read_text() == markdown(table)
    assert (out / "compare.csv").read_text() == to_csv(table)
    data = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in data["columns"]] == ["baseline", "hypothesis", "regular"]
    assert data["columns"][1]["files"] == [str(runs["hypothesis"])]
    assert data["rows"][0]["derived"]["H−B"]["p"] == 20 / 512
    (fields,) = csv.DictReader(io.StringIO((out / "compare.csv").read_text()))
    assert float(fields["hypothesis"]) == pytest.approx(0.9) and fields["H−B p"] == "0.03906"  # 20 / 512, 4 digits
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert lm_eval_taskvec.compare is compare


def test_csv_rounds_floats_to_4_decimals_keeping_4_significant_digits(tmp_path):
    runs = three_modes(tmp_path)
    data = json.loads(runs["hypothesis"].read_text())
    data["results"]["tv_a"]["paper_match,none"] = 0.39999999999999997  # as float sums come out of lm-eval
    runs["hypothesis"].write_text(json.dumps(data))
    text = to_csv(build(load_runs(list(runs.values()))))
    (fields,) = csv.DictReader(io.StringIO(text))
    assert fields["hypothesis"] == "0.4"
    assert fields["baseline stderr"] == str(round(_stderr(B), 4)) and fields["regular stderr"] == "0.0"
    assert fields["H−B"] == str(round(0.39999999999999997 - 0.2, 4)) and fields["H−B p"] == "0.03906"  # 20 / 512
    assert fields["H/R"] == "0.4" and fields["H/R p"] == "1.0" and fields["hypothesis n"] == "10"
    for value in fields.values():
        if "." in value and value.replace(".", "").replace("-", "").isdigit():
            decimals = value.split(".")[1]
            assert len(decimals) <= 4 or len(decimals.lstrip("0")) <= 4, value


def test_a_whole_limit_prints_as_an_integer(tmp_path):
    a = write_run(tmp_path / "a", {"tv_a": {"paper_match": H}}, limit=10.0)  # lm-eval writes --limit 10 as 10.0
    b = write_run(tmp_path / "b", {"tv_a": {"paper_match": H[:5]}}, limit=0.5)
    table = build(load_runs([a, b]))
    assert [c.label for c in table.columns] == ["hypothesis limit=10", "hypothesis limit=0.5"]
    assert table.footnotes[0].startswith(
        "limit differs between columns: hypothesis limit=10 10, hypothesis limit=0.5 0.5;"
    )
    text = markdown(table)
    assert "`, limit 10; `" in text and "`, limit 0.5; `" in text and "10.0" not in text
    assert [c.describe()["limit"] for c in table.columns] == [10, 0.5]


def _modes_with_a_zero_baseline(tmp_path, embedded=False):
    """tv_a: B, H and R as in three_modes; tv_z: the baseline scores nothing, hypothesis and regular all but one."""
    paths = []
    for mode, a, z in (("regular", R, [1] * 9 + [0]), ("hypothesis", H, [0] + [1] * 9), ("baseline", B, [0] * 10)):
        path = write_run(
            tmp_path / mode, {"tv_a": {"paper_match": a}, "tv_z": {"paper_match": z}}, mode=mode, limit=10.0, nshot=4
        )
        if embedded:
            data = json.loads(path.read_text())
            data["config"]["model_args"]["pretrained"] = "embedded"
            data["config"]["embedded_model"] = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "package": "x"}
            path.write_text(json.dumps(data))
        paths.append(path)
    return build(load_runs(paths))


def _drawn(fig) -> dict:
    return {a.get_gid(): a for a in fig.axes[0].get_children() if a.get_gid()}


@pytest.fixture
def figure():
    """compare.png's figure of a table."""
    from lm_eval_taskvec.comparison.plot import figure

    return figure


def test_plot_title_names_the_embedded_model_n_shots_and_a_whole_limit(tmp_path, figure):
    fig = figure(_modes_with_a_zero_baseline(tmp_path, embedded=True))
    assert fig.axes[0].get_title() == (
        "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)\nn = 10 documents per task, 4-shot, limit 10"
    )
    assert "Model: `HuggingFaceTB/SmolLM2-135M-Instruct (embedded)`." in markdown(
        _modes_with_a_zero_baseline(tmp_path / "md", embedded=True)
    )
    fig = figure(_modes_with_a_zero_baseline(tmp_path / "other"))
    assert fig.axes[0].get_title().startswith(f"{MODEL}\n")


def test_plot_draws_bars_of_height_zero_so_they_show(tmp_path, figure):
    from matplotlib.colors import to_hex

    fig = figure(_modes_with_a_zero_baseline(tmp_path))
    marks = {gid: a for gid, a in _drawn(fig).items() if gid.startswith("zero:")}
    assert list(marks) == ["zero:baseline:tv_z"]  # the one cell whose value is 0
    mark = marks["zero:baseline:tv_z"]
    assert list(mark.get_ydata()) == [0, 0] and mark.get_linewidth() >= 2
    assert fig.axes[0].get_ylim()[0] < 0  # below the axis line, not hidden by it
    bars = [p for p in fig.axes[0].patches if p.get_height() == 0]
    assert len(bars) == 1 and mark.get_color() == to_hex(bars[0].get_facecolor())  # in the bar's colour


def test_plot_marks_significant_pairs_and_explains_marks_and_whiskers(tmp_path, figure):
    table = _modes_with_a_zero_baseline(tmp_path)
    significant = {(p.name, r.name) for r in table.rows for p in table.pairs if r.derived[p.name]["significant"]}
    # H−B: H right alone on 8 documents of tv_a, B on 1 (p = 20/512); on 9 of tv_z (p = 2/512); H/R: p = 1 on both
    assert significant == {("H−B", "tv_a"), ("H−B", "tv_z")}
    fig = figure(table)
    brackets = {gid for gid in _drawn(fig) if gid.startswith("sig:")}
    assert brackets == {"sig:H−B:tv_a", "sig:H−B:tv_z"}
    stars = [a for gid, a in _drawn(fig).items() if gid.startswith("star:")]
    assert len(stars) == 2 and {s.get_text() for s in stars} == {"*"}
    legend = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "± stderr" in legend and "*: p < 0.05 in a paired test" in legend


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not JSON"),
        ('{"results": {"a": {}}}', "no 'results' and 'config' objects"),
        ('{"results": {}, "config": {}}', "holds no task results"),
    ],
)
def test_a_file_that_is_not_an_lm_eval_results_file_is_refused(tmp_path, content, message):
    path = tmp_path / "results_x.json"
    path.write_text(content)
    with pytest.raises(ResultsPathError, match=message) as error:
        load_runs([path])
    assert str(path) in str(error.value) and "lm_eval --output_path" in str(error.value)


def test_missing_paths_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(ResultsPathError, match="no such file or folder"):
        load_runs([tmp_path / "nope"])
    with pytest.raises(ResultsPathError, match=r"no lm-eval results file \(results_\*.json\) under this folder"):
        load_runs([tmp_path])
    with pytest.raises(UsageError, match="^results: give lm-eval results files"):
        compare([])
    with pytest.raises(UsageError, match="^limit: options for running the modes; give tasks too"):
        compare([], limit=3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model_args": "pretrained=/nowhere,mode=hypothesis"}, "^model_args: leave out mode=hypothesis; modes"),
        ({"modes": "regular,hypotesis"}, "^modes: regular,hypotesis is not a list of distinct modes from regular,"),
        ({"modes": "baseline,baseline"}, "^modes: baseline,baseline is not a list of distinct modes"),
        ({"seed": "1,2"}, r"^seed: '1,2' has 2 values; give one, or four \(python,numpy,torch,fewshot\)"),
        ({"seed": "x"}, "^seed: 'x' is not one integer or four separated by commas"),
    ],
)
def test_running_options_are_checked_before_the_model_loads(tmp_path, options, message):
    options = {"model_args": "pretrained=/nowhere"} | options  # loading it would fail otherwise
    with pytest.raises(UsageError, match=message):
        compare(tasks="tv_letter_to_upper", output_path=tmp_path, **options)


def test_seed_is_read_as_lm_evals():
    from lm_eval_taskvec.comparison.evaluate import _seeds

    assert _seeds(None) == {}
    assert (
        _seeds("7")
        == _seeds(7)
        == dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), 7)
    )
    assert list(_seeds("0,None,8,52").values()) == [0, None, 8, 52]


def taskvec(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lm_eval_taskvec.cli", "compare", *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_help_shows_the_defaults():
    done = taskvec("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for expected in (
        "RESULTS",
        "--modes MODES comma-separated subset of the modes (default: regular,hypothesis,baseline)",
        "(default: taskvec_compare)",
        "paired bootstrap resamples (default: 10000)",
        "--log_samples",
        "taskvec compare --model_args pretrained=embedded --tasks task_vectors",
        "--limit LIMIT scored documents per task",
        "layer=auto's sweep, which scores num_dev dev prompts per task (default 50",
        "--model_args num_dev=N",
    ):
        assert expected in text, expected


def test_cli_refuses_a_path_that_is_not_a_results_file(tmp_path):
    bad = tmp_path / "samples_tv_a_2025.jsonl"
    bad.write_text('{"doc_id": 0}\n{"doc_id": 1}\n')
    done = taskvec(str(bad), "--output_path", str(tmp_path / "out"))
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert f"taskvec compare: error: RESULTS {bad}: not an lm-eval results file" in done.stderr


def test_cli_prints_and_writes_the_table(tmp_path):
    three_modes(tmp_path / "runs")
    done = taskvec(str(tmp_path / "runs"), "--output_path", str(tmp_path / "out"), "--no_plot")
    assert done.returncode == 0, done.stderr
    assert "| tv_a | paper_match (exact_match) | 0.20 ± 0.13 (0.00) |" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.csv", "compare.json", "compare.md"]


@pytest.mark.slow
def test_running_the_modes_writes_what_each_separate_run_writes(tmp_path, saved_model, monkeypatch):
    """One loaded model, three modes: each mode's results and samples equal a fresh model's run of that mode."""
    model_dir = saved_model()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.comparison import MODES
    from lm_eval_taskvec.model import TaskVectorLM

    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    tasks = ["tv_letter_to_upper", "tv_list_first"]
    out = tmp_path / "out"
    table = compare(
        model_args=f"pretrained={model_dir},layer=1",
        tasks=",".join(tasks),
        output_path=out,
        limit=6,
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    assert [c.label for c in table.columns] == ["baseline", "hypothesis L1", "regular"]
    assert [p.name for p in table.pairs] == ["H/R", "H−B"] and table.rows[0].layers == {"hypothesis L1": "1"}
    manager = TaskManager()
    for mode in MODES:
        (path,) = (out / mode).glob("*/results_*.json")
        data = json.loads(path.read_text())
        assert (data["config"]["model"], data["model_source"], data["config"]["model_args"]["mode"]) == (
            "hf-taskvec",
            "hf-taskvec",
            mode,
        )
        assert data["config"]["taskvec"]["mode"] == mode
        assert {data["configs"][t]["metadata"]["mode"] for t in tasks} == {mode}
        lm = TaskVectorLM(pretrained=str(model_dir), mode=mode, layer=1, batch_size=4, device="cpu")
        alone = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=6, task_manager=manager, log_samples=True)
        for task in tasks:
            assert data["results"][task] == alone["results"][task]
            (samples,) = path.parent.glob(f"samples_{task}_*.jsonl")
            logged = [json.loads(line) for line in samples.read_text().split("\n") if line]  # not splitlines: U+2028
            expected = sorted(alone["samples"][task], key=lambda s: s["doc_id"])
            assert [s["resps"] for s in logged] == [s["resps"] for s in expected]
            assert len(logged) == 6


def test_drawing_a_figure_leaves_pyplot_and_its_backend_alone(tmp_path):
    """A notebook user's backend and open figures stay as they were: figures are objects, not pyplot state."""
    import matplotlib
    import matplotlib.pyplot as plt

    from lm_eval_taskvec.comparison.plot import plot

    saved = matplotlib.get_backend()
    matplotlib.use("svg")  # the user's own choice, not the file-only Agg a careless plot would switch to
    try:
        plt.figure()
        before = plt.get_fignums()
        plot(_modes_with_a_zero_baseline(tmp_path), tmp_path / "c.png")
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == before
    finally:
        plt.close("all")
        matplotlib.use(saved)


def test_the_layer_column_shows_every_block_a_cross_fitted_task_was_patched_at(tmp_path):
    """A cross-fitted task's documents were patched at its halves' blocks (9 and 10), not at the pooled choice
    (10); a group shows the range of every block its tasks used."""
    metrics = {"paper_match": H, "exact_match": H}
    path = write_run(
        tmp_path / "h",
        {"tv_a": metrics, "tv_b": metrics},
        mode="hypothesis",
        layers={"tv_a": 10, "tv_b": 4},
        groups={"tv_g": ["tv_a", "tv_b"]},
        group_values={"tv_g": {"paper_match,none": 0.9}},
    )
    data = json.loads(path.read_text())
    data["config"]["taskvec"]["layer_selection"]["tv_a"]["folds"] = [{"layer": 9}, {"layer": 10}]
    path.write_text(json.dumps(data))
    rows = {row.name: row for row in build(load_runs([path])).rows}
    assert rows["tv_a"].layers == {"hypothesis": "9, 10"} and rows["tv_b"].layers == {"hypothesis": "4"}
    assert rows["tv_g"].layers == {"hypothesis": "4-10"}


def test_stored_runs_of_several_methods_get_a_column_each_tested_against_regular_and_baseline(tmp_path):
    runs = three_modes(tmp_path)
    elicit = json.loads(runs["hypothesis"].read_text())
    elicit["config"]["model_args"]["method"] = "elicit"
    elicit["config"]["taskvec"] |= {"method": "elicit", "vector": "prompt", "op": "add", "scale": 2.0}
    elicit["config"]["taskvec"]["layer_selection"]["tv_a"]["layer"] = 9
    (tmp_path / "elicit").mkdir()
    (tmp_path / "elicit" / runs["hypothesis"].name).write_text(json.dumps(elicit))
    for samples in runs["hypothesis"].parent.glob("samples_*.jsonl"):
        (tmp_path / "elicit" / samples.name).write_text(samples.read_text())
    table = build(load_runs([runs["regular"], runs["hypothesis"], tmp_path / "elicit", runs["baseline"]]))
    labels = ["baseline", "hypothesis hendel", "hypothesis elicit", "regular"]
    assert [c.label for c in table.columns] == labels
    assert [p.name for p in table.pairs] == [f"{h}: {p}" for h in labels[1:3] for p in ("H/R", "H−B")]
    (row,) = table.rows
    assert row.layers == {"hypothesis hendel": "7", "hypothesis elicit": "9"}
    assert row.derived["hypothesis elicit: H−B"]["value"] == pytest.approx(0.7)


def test_compare_with_methods_runs_each_methods_hypothesis_as_a_separate_run_would(tmp_path, saved_model, monkeypatch):
    """One loaded model: regular and baseline once, hypothesis per method; each method's results and samples
    equal a fresh model's run of that method alone."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.model import TaskVectorLM

    model_dir = saved_model()
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    tasks, out, methods = ["tv_list_first"], tmp_path / "out", ("hendel", "elicit", "task_mean", "function_vector")
    table = compare(
        model_args=f"pretrained={model_dir},layer=1,num_dev=6",
        tasks=",".join(tasks),
        output_path=out,
        methods=",".join(methods),
        limit=4,
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    hypotheses = [f"hypothesis {m} L1" for m in methods]
    assert [c.label for c in table.columns] == ["baseline", *hypotheses, "regular"]
    assert sorted(p.name for p in table.pairs) == sorted(f"{h}: {p}" for h in hypotheses for p in ("H/R", "H−B"))
    assert sorted(f.name for f in out.iterdir() if f.is_dir()) == sorted(
        ["baseline", "regular", *(f"hypothesis-{m}" for m in methods)]
    )
    for method in methods:
        (path,) = (out / f"hypothesis-{method}").glob("*/results_*.json")
        data = json.loads(path.read_text())
        assert data["config"]["taskvec"]["method"] == method
        lm = TaskVectorLM(
            pretrained=str(model_dir), mode="hypothesis", method=method, layer=1, num_dev=6, batch_size=4, device="cpu"
        )
        alone = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=4, task_manager=TaskManager(), log_samples=True)
        assert data["results"][tasks[0]] == alone["results"][tasks[0]]
        (samples,) = path.parent.glob(f"samples_{tasks[0]}_*.jsonl")
        logged = [json.loads(line) for line in samples.read_text().split("\n") if line]
        assert [s["resps"] for s in logged] == [
            s["resps"] for s in sorted(alone["samples"][tasks[0]], key=lambda s: s["doc_id"])
        ]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"methods": "hendel,pca"}, "^methods: hendel,pca is not a list of distinct methods from hendel,"),
        ({"methods": "elicit", "modes": "regular,baseline"}, "^methods: each method is a hypothesis run"),
        ({"methods": "elicit", "model_args": "pretrained=/nowhere,op=add"}, "^model_args: leave out op; methods"),
    ],
)
def test_methods_are_checked_before_the_model_loads(tmp_path, options, message):
    options = {"model_args": "pretrained=/nowhere"} | options
    with pytest.raises(UsageError, match=message):
        compare(tasks="tv_letter_to_upper", output_path=tmp_path, **options)
