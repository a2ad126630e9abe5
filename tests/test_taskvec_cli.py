"""``taskvec``: lm_eval's option names and defaults, the sweep's outputs, and a plot that explains itself."""

from __future__ import annotations

import json

import pytest

from lm_eval_taskvec import cli
from lm_eval_taskvec import sweep_report as report


def parse(monkeypatch, *argv: str):
    seen = []
    monkeypatch.setattr(cli, "run_sweep", seen.append)
    cli.main(["sweep", "--tasks", "tv_list_first", *argv])
    return seen[0]


def test_defaults_are_lm_evals(monkeypatch):
    args = parse(monkeypatch)
    assert (args.batch_size, args.device, args.limit, args.num_fewshot, args.gen_kwargs) == (
        "1",
        None,
        None,
        None,
        None,
    )
    assert args.seed == [0, 1234, 1234, 1234] and args.verbosity == "INFO" and args.layer_cache == "on"


def test_options_parse_as_lm_eval_parses_them(monkeypatch):
    args = parse(
        monkeypatch,
        "--tasks",
        "tv_list_last",
        "tv_next_letter,tv_prev_letter",
        "--model_args",
        "pretrained=x,num_dummy=3",
        "--gen_kwargs",
        "max_gen_toks=1",
        "--seed",
        "7",
        "-v",
        "debug",
        "--batch_size",
        "auto",
        "--layer_cache",
        "refresh",
    )
    assert args.tasks == ["tv_list_first", "tv_list_last", "tv_next_letter", "tv_prev_letter"]
    assert args.model_args == {"pretrained": "x", "num_dummy": 3} and args.gen_kwargs == {"max_gen_toks": 1}
    assert args.seed == [7, 7, 7, 7] and args.verbosity == "DEBUG" and args.batch_size == "auto"


def test_help_shows_defaults_and_no_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "(default: 1)",
        "(default: INFO)",
        "(default: 0,1234,1234,1234)",
        "(default: on)",
        "default: cuda when available, else cpu",
        "default: 50",
    ):
        assert shown in text
    assert "``" not in text and "(default: None)" not in text


def test_old_no_cache_flag_is_gone(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--tasks", "tv_list_first", "--no_cache"])
    assert "unrecognized arguments: --no_cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--limit", "0.5"], "--limit 0.5: taskvec sweep counts dev prompts, give an integer >= 2"),
        (["--model_args", "mode=regular"], "taskvec sweep sets mode itself: remove it from --model_args"),
    ],
)
def test_bad_arguments_say_what_to_do(monkeypatch, argv, message):
    monkeypatch.setattr("lm_eval.utils.setup_logging", lambda *a, **k: None)
    with pytest.raises(SystemExit, match=message):
        cli.main(["sweep", "--tasks", "tv_list_first", *argv])


@pytest.mark.slow  # lm-eval indexes its ~14,700 built-in tasks (~20 s)
def test_sweep_writes_rounded_json_a_table_and_a_titled_plot(saved_model, tmp_path, monkeypatch, capsys):
    model_dir = saved_model()
    monkeypatch.setattr("lm_eval.utils.setup_logging", lambda *a, **k: None)  # keeps caplog working for others
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    titles = []
    monkeypatch.setattr(report, "plot", lambda choices, path, title: titles.append(title) or path.write_bytes(b"png"))
    out = tmp_path / "sweep"
    cli.main(
        [
            "sweep",
            "--model_args",
            f"pretrained={model_dir}",
            "--tasks",
            "tv_list_first,tv_list_last",
            "--limit",
            "7",
            "--num_fewshot",
            "3",
            "--output_path",
            str(out),
        ]
    )
    choices = json.loads((out / "sweep.json").read_text())
    assert sorted(choices) == ["tv_list_first", "tv_list_last"]
    for choice in choices.values():
        assert choice["num_dev"] == 7 and len(choice["dev_accuracy"]) == 3
        assert all(round(v, 4) == v and round(v * 7) == pytest.approx(v * 7, abs=1e-3) for v in choice["dev_accuracy"])
    printed = capsys.readouterr().out
    assert "block | tv_list_first | tv_list_last | mean" in printed
    assert titles == [
        f"{model_dir}\ntv_list_first, tv_list_last: n = 7 dev prompts per task, 3-shot, 2 dummy queries per θ"
    ]


def curves(*values):
    return [list(v) for v in values]


def choice(curve, layer, **extra):
    return {"layer": layer, "dev_accuracy": curve, "num_dev": 10} | extra


def lines(fig):
    return {line.get_gid(): line for line in fig.axes[0].get_lines() if line.get_gid()}


def legend_texts(fig):
    return [
        t.get_text()
        for legend in fig.axes[0].findobj(lambda o: type(o).__name__ == "Legend")
        for t in legend.get_texts()
    ]


def test_one_task_keeps_its_own_line_and_gets_its_reference_lines():
    fig = report.figure({"tv_a": choice([0.1, 0.8, 0.4], 1, baseline_accuracy=0.2, regular_accuracy=0.9)}, "T")
    drawn = lines(fig)
    assert list(drawn["task:tv_a"].get_ydata()) == [0.1, 0.8, 0.4] and "mean" not in drawn
    assert list(drawn["baseline"].get_ydata()) == [0.2, 0.2] and list(drawn["regular"].get_ydata()) == [0.9, 0.9]
    assert legend_texts(fig) == [
        "hypothesis, tv_a",
        "chosen block (per task: its marker, large)",
        "baseline (query alone)",
        "regular ICL",
    ]
    assert fig.axes[0].get_title() == "T"


def test_several_tasks_get_a_mean_and_mean_reference_lines_all_explained():
    fig = report.figure(
        {
            "tv_a": choice([0.0, 0.6, 0.2], 1, baseline_accuracy=0.1, regular_accuracy=0.9),
            "tv_b": choice([0.2, 0.2, 1.0], 2, baseline_accuracy=0.3, regular_accuracy=0.7),
        },
        "T",
    )
    drawn = lines(fig)
    assert list(drawn["mean"].get_ydata()) == pytest.approx([0.1, 0.4, 0.6])
    assert list(drawn["best"].get_xdata()) == [2, 2]
    assert list(drawn["baseline"].get_ydata()) == pytest.approx([0.2, 0.2])
    assert list(drawn["regular"].get_ydata()) == pytest.approx([0.8, 0.8])
    assert list(drawn["chosen:tv_b"].get_xdata()) == [2] and list(drawn["chosen:tv_b"].get_ydata()) == [1.0]
    assert legend_texts(fig) == [
        "hypothesis, a task (colours and markers at right)",
        "chosen block (per task: its marker, large)",
        "hypothesis, mean over 2 tasks",
        "best block of the mean (2)",
        "baseline (query alone), mean over tasks",
        "regular ICL, mean over tasks",
        " ",
        "tv_a",
        "tv_b",
    ]


def test_reference_lines_only_where_every_task_has_the_score():
    fig = report.figure({"tv_a": choice([0.0, 0.5], 1, baseline_accuracy=0.1), "tv_b": choice([0.2, 0.2], 0)}, "T")
    assert "baseline" not in lines(fig) and not any("baseline" in t for t in legend_texts(fig))


def test_plot_writes_a_png(tmp_path):
    report.plot({"tv_a": choice([0.1, 0.8], 1)}, tmp_path / "s.png", "T")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_eighteen_equal_curves_stay_apart_in_colour_marker_and_marker_positions():
    names = [f"tv_{i:02d}" for i in range(18)]
    fig = report.figure({n: choice([0.0, 0.1, 0.5, 0.5, 0.2, 0.0], 2) for n in names}, "T")
    drawn = lines(fig)
    styles = [(drawn[f"task:{n}"].get_color(), drawn[f"task:{n}"].get_marker()) for n in names]
    assert len(set(styles)) == 18 and len({color for color, _ in styles}) == 18  # a colour of its own each
    assert {drawn[f"chosen:{n}"].get_marker() for n in names} == {marker for _, marker in styles}
    first, second = (drawn[f"task:{n}"].get_markevery() for n in names[:2])
    assert first != second  # equal curves: each task's markers at other blocks, so both show
    many = [report.task_style(i) for i in range(100)]
    assert len(set(many)) == 100


def test_tasks_flagged_no_effect_are_dashed_hollow_and_named_in_the_legend():
    fig = report.figure(
        {
            "tv_a": choice([0.1, 0.8, 0.4], 1, no_effect=False),
            "tv_b": choice([0.1, 0.2, 0.1], 1, no_effect=True),
            "tv_c": choice(
                [0.1, 0.5, 0.3],
                1,
                no_effect=False,
                folds=[{"scored_fold": 0, "no_effect": False}, {"scored_fold": 1, "no_effect": True}],
            ),
            "tv_d": choice(
                [0.1, 0.1, 0.1],
                0,
                no_effect=True,
                folds=[{"scored_fold": 0, "no_effect": True}, {"scored_fold": 1, "no_effect": True}],
            ),
        },
        "T",
    )
    drawn = lines(fig)
    assert [drawn[f"task:{n}"].get_linestyle() for n in ("tv_a", "tv_b", "tv_c", "tv_d")] == ["-", "--", "--", "--"]
    assert drawn["chosen:tv_a"].get_markerfacecolor() == drawn["task:tv_a"].get_color()
    for name in ("tv_b", "tv_c", "tv_d"):  # hollow: white inside, the task's colour around
        chosen, color = drawn[f"chosen:{name}"], drawn[f"task:{name}"].get_color()
        assert chosen.get_markerfacecolor() == "white" and chosen.get_markeredgecolor() == color
    texts = legend_texts(fig)
    assert texts[-4:] == ["tv_a", "tv_b (no effect)", "tv_c (no effect in half 1)", "tv_d (no effect)"]
    assert "no effect (not better than the query alone, McNemar)" in texts
    assert not any("no effect" in t for t in legend_texts(report.figure({"tv_a": choice([0.1, 0.8], 1)}, "T")))
    alone = report.figure({"tv_b": choice([0.1, 0.2], 1, no_effect=True)}, "T")
    assert legend_texts(alone)[0] == "hypothesis, tv_b (no effect)"
    assert lines(alone)["task:tv_b"].get_linestyle() == "--"
