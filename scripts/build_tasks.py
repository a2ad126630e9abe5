#!/usr/bin/env python
"""Generate the algorithmic tasks, assign splits and validate every task data file.

    python scripts/build_tasks.py                  # regenerate + assign splits + validate, then write
    python scripts/build_tasks.py --check          # validate only (also: files must be up to date)
    python scripts/build_tasks.py --allow-missing  # skip data files that do not exist yet
    python scripts/build_tasks.py tv_antonyms ...  # only these tasks

Splits are a pure function of the task's set of inputs (seeded shuffle of the sorted inputs), and
so is the order of the rows within each split (another seeded shuffle, so that --limit takes a
random sample): rerunning is idempotent and independent of row order. Exits 1 and lists the problems if any.
"""

import argparse
import json
import random
import string
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "task_configs" / "data"
SEED = 41
SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.4, "validation": 0.2}  # test gets the rest (~0.4)

CATEGORIES = {
    "tv_algorithmic": [
        "tv_next_letter",
        "tv_prev_letter",
        "tv_list_first",
        "tv_list_last",
        "tv_letter_to_upper",
        "tv_letter_to_lower",
    ],
    "tv_translation": ["tv_fr_en", "tv_es_en", "tv_en_fr", "tv_en_es"],
    "tv_linguistic": ["tv_present_gerund", "tv_present_past", "tv_plural_singular", "tv_antonyms"],
    "tv_knowledge": ["tv_country_capital", "tv_person_language", "tv_location_continent", "tv_location_religion"],
}
TASKS = [task for tasks in CATEGORIES.values() for task in tasks]
# Too few items for disjoint splits: every split holds the whole set (see task_configs/README.md).
LETTER_TASKS = {"tv_next_letter", "tv_prev_letter", "tv_letter_to_upper", "tv_letter_to_lower"}
LIST_SIZE = 400


def _lists(pick) -> list[dict]:
    rnd = random.Random(SEED)
    seen = {}
    while len(seen) < LIST_SIZE:
        items = rnd.choices(string.ascii_lowercase, k=rnd.randint(2, 4))
        seen.setdefault(",".join(items), pick(items))
    return [{"input": x, "answers": [y]} for x, y in seen.items()]


LOWER = string.ascii_lowercase
GENERATORS = {
    "tv_next_letter": lambda: [{"input": a, "answers": [b]} for a, b in zip(LOWER, LOWER[1:])],
    "tv_prev_letter": lambda: [{"input": b, "answers": [a]} for a, b in zip(LOWER, LOWER[1:])],
    "tv_letter_to_upper": lambda: [{"input": c, "answers": [c.upper()]} for c in LOWER],
    "tv_letter_to_lower": lambda: [{"input": c.upper(), "answers": [c]} for c in LOWER],
    "tv_list_first": lambda: _lists(lambda items: items[0]),
    "tv_list_last": lambda: _lists(lambda items: items[-1]),
}


def min_size(task: str) -> int:
    if task in LETTER_TASKS:
        return 25
    return {"tv_list_first": 300, "tv_list_last": 300, "tv_country_capital": 190}.get(task, 150)


def assign_splits(task: str, rows: list[dict]) -> list[dict]:
    """Rows with a `split` field, split by split, each split in a seeded shuffled order.

    Letter tasks get one copy of every row per split. The shuffle makes any prefix (``--limit``) a
    random sample: source files are often sorted by answer (all the "Europe" places first).
    """
    rows = [{k: v for k, v in r.items() if k != "split"} for r in rows]  # other keys: flagged later
    if task in LETTER_TASKS:
        split_rows = {split: rows for split in SPLITS}
    else:
        order = sorted({r["input"] for r in rows})
        random.Random(f"{SEED}:{task}").shuffle(order)
        n_train = round(FRACTIONS["train"] * len(order))
        n_val = round(FRACTIONS["validation"] * len(order))
        split_of = {
            x: "train" if i < n_train else "validation" if i < n_train + n_val else "test" for i, x in enumerate(order)
        }
        split_rows = {split: [r for r in rows if split_of[r["input"]] == split] for split in SPLITS}
    return [{**r, "split": split} for split in SPLITS for r in shuffled(task, split, split_rows[split])]


def shuffled(task: str, split: str, rows: list[dict]) -> list[dict]:
    """``rows`` in an order that depends only on their content and a per-split seed (idempotent)."""
    ordered = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
    random.Random(f"{SEED}:{task}:{split}:order").shuffle(ordered)
    return ordered


def validate(task: str, rows: list[dict]) -> list[str]:
    problems = []
    inputs = {split: [] for split in SPLITS}
    for i, row in enumerate(rows, 1):
        where = f"{task} row {i}"
        if set(row) != {"input", "answers", "split"}:
            problems.append(f"{where}: keys must be input, answers, split; got {sorted(row)}")
            continue
        x, answers, split = row["input"], row["answers"], row["split"]
        if split not in SPLITS:
            problems.append(f"{where}: unknown split {split!r}")
            continue
        if not isinstance(x, str) or not x or x != x.strip() or "\n" in x:
            problems.append(f"{where}: input must be a non-empty stripped one-line string: {x!r}")
        if not isinstance(answers, list) or not answers:
            problems.append(f"{where}: answers must be a non-empty list: {answers!r}")
        elif any(not isinstance(a, str) or not a or a != a.strip() or "\n" in a for a in answers):
            problems.append(f"{where}: every answer must be a non-empty stripped one-line string: {answers!r}")
        elif len(set(answers)) != len(answers):
            problems.append(f"{where}: duplicate answers {answers!r}")
        inputs[split].append(x)
    for split, xs in inputs.items():
        dupes = sorted({x for x in xs if xs.count(x) > 1})
        if dupes:
            problems.append(f"{task}: duplicate inputs in {split}: {dupes[:10]}")
        if not xs:
            problems.append(f"{task}: split {split} is empty")
    if task in LETTER_TASKS:
        if not set(inputs["train"]) == set(inputs["validation"]) == set(inputs["test"]):
            problems.append(f"{task}: letter tasks must hold the full item set in every split")
    else:
        for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
            shared = sorted(set(inputs[a]) & set(inputs[b]))
            if shared:
                problems.append(f"{task}: {a} and {b} share inputs: {shared[:10]}")
    n_items = len({x for xs in inputs.values() for x in xs})
    if n_items < min_size(task):
        problems.append(f"{task}: {n_items} distinct inputs, need at least {min_size(task)}")
    return problems


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(task: str, check: bool, allow_missing: bool) -> list[str]:
    path = DATA_DIR / f"{task}.jsonl"
    if task not in GENERATORS and not path.exists():
        return [] if allow_missing else [f"{task}: missing data file {path}"]
    try:
        current = read_rows(path) if path.exists() else []
        source = GENERATORS[task]() if task in GENERATORS else current
        built = assign_splits(task, source)
    except (ValueError, KeyError, TypeError) as e:
        return [f"{task}: unreadable data file {path}: {e!r}"]
    problems = validate(task, built)
    if check:
        if not problems and current != built:
            problems.append(f"{task}: {path.name} is out of date; run scripts/build_tasks.py")
    elif not problems and current != built:
        path.write_text(dump(built), encoding="utf-8")
        print(f"wrote {path.relative_to(DATA_DIR.parent.parent)} ({len(built)} rows)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK", help="default: all 18")
    parser.add_argument("--check", action="store_true", help="validate only, write nothing")
    parser.add_argument("--allow-missing", action="store_true", help="skip data files not written yet")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {TASKS}")
    problems = [p for task in args.tasks or TASKS for p in build(task, args.check, args.allow_missing)]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    summary = f"{len(problems)} problem(s) in {len(args.tasks or TASKS)} task(s)"
    print(summary, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
