"""Every shell command and Python block of README.md, docs/*.md and task_configs/README.md runs as written.

They run in document order in a copy of this checkout, with a fresh ``.venv`` (the README's own set-up
commands create it) and a fresh model cache, on the CPU: the README first, then the pages of ``docs/`` in the
order of the README's "Where to read more" (any page it does not list after them), then
task_configs/README.md. Four departures, each visible in the test ids or in ``docs_run.md``:
- ``make test`` is skipped: it is the command running this test;
- model runs get small limits: ``--limit 5`` (or less) for ``lm_eval``, ``taskvec sweep`` and ``taskvec
  compare``, ``LIMIT=5`` for ``make demo``, ``limit=5`` for ``simple_evaluate``; the analyses (which take no
  ``--limit``) at most 2 demonstration sets or 5 queries; and wherever hf-taskvec may sweep for layer=auto,
  5 dev prompts (``num_dev=5``);
- the benchmarks run one round (``--repeats 1``) on 5 documents or 5 dev prompts per half;
- commands that need the Hugging Face Hub (a Hub model or a task from lm-eval's own catalogue) are skipped
  when it cannot be reached or ``HF_HUB_OFFLINE`` is set.
What each command printed and how long it took goes to ``docs_run.md`` in pytest's temporary folder.
A fast test checks that every relative link and image of these documents resolves from the file it is in.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5
TIMEOUT = 40 * 60  # make demo installs torch and lm-eval, then fetches and converts the model


def _pages() -> list[str]:
    """docs/*.md in the order the README's "Where to read more" links them, then any page it does not link."""
    more = (ROOT / "README.md").read_text().partition("## Where to read more")[2]
    linked = list(dict.fromkeys(re.findall(r"\]\((docs/[^)#\s]+\.md)\)", more)))
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    return [p for p in linked if p in pages] + [p for p in pages if p not in linked]


DOCS = ["README.md", *_pages(), "task_configs/README.md"]


def steps(doc: str) -> list[tuple[str, str, str]]:
    """(id, kind, code) for each shell command and each Python block, in document order."""
    found = []
    for match in re.finditer(r"^```(bash|sh|console|python)\n(.*?)^```", (ROOT / doc).read_text(), re.S | re.M):
        kind, code = match.groups()
        line = (ROOT / doc).read_text()[: match.start()].count("\n") + 2
        if kind == "python":
            found.append((f"{doc}:{line}", "python", code))
            continue
        for offset, command in _commands(code):
            found.append((f"{doc}:{line + offset}", "shell", command))
    return found


def _commands(code: str):
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    start, parts = None, []
    for n, text in enumerate(code.splitlines()):
        if start is None and (not text.strip() or text.lstrip().startswith("#")):
            continue
        start = n if start is None else start
        parts.append(text.rstrip().removesuffix("\\"))
        if not text.rstrip().endswith("\\"):
            yield start, " ".join(p.strip() for p in parts)
            start, parts = None, []


def _needs_hub(command: str) -> bool:
    model = re.search(r"pretrained=([^,\s]+)", command)
    tasks = re.search(r"--tasks\s+(\S+)", command)
    hub_model = (
        model is not None
        and model.group(1) != "embedded"
        and "/" in model.group(1)
        and not model.group(1).startswith(("/", "."))
    )
    hub_task = tasks is not None and not all(
        t.startswith(("tv_", "task_vectors")) or t.endswith("_offline") for t in tasks.group(1).split(",")
    )
    return hub_model or hub_task


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


ANALYSES = {
    "geometry": {"--num_sets": 2},
    "conflict": {"--num_docs": LIMIT},
    "vocab": {"--num_sets": 2},
    "export": {"--num_sets": 2},
}
DEV_PROMPTS = 5  # num_dev for layer=auto's sweeps, which --limit does not cap
BENCHMARKS = {
    "bench_modes.py": {"--limit": LIMIT, "--repeats": 1},
    "bench_sweep_mc.py": {"--num_dev": DEV_PROMPTS, "--repeats": 1},
    "bench_methods.py": {"--limit": LIMIT, "--num_dev": DEV_PROMPTS},
    "bench_function_vectors.py": {"--num_dev": DEV_PROMPTS},
}


def _capped(command: str, option: str, most: int) -> str:
    if option not in command:
        return f"{command} {option} {most}"
    return re.sub(rf"{option}\s+(\d+)", lambda m: f"{option} {min(int(m.group(1)), most)}", command)


def _limited(command: str) -> tuple[str, dict]:
    """The command with a small limit where it would run a model over whole tasks, and extra environment."""
    command = re.split(r"\s+#\s", command, maxsplit=1)[0]  # a trailing comment would swallow an added option
    if re.match(r"make demo\b", command):
        return command, {"LIMIT": str(LIMIT), "MODEL_ARGS": f"pretrained=embedded,num_dev={DEV_PROMPTS}"}
    if (
        re.match(r"lm_eval\b", command)
        and "--model hf-taskvec" in command
        or re.match(r"taskvec compare\b.*--tasks", command)
    ):
        return _few_dev_prompts(_capped(command, "--limit", LIMIT)), {}
    if re.match(r"lm_eval\b", command) and "--model " in command or re.match(r"taskvec sweep\b", command):
        return _capped(command, "--limit", LIMIT), {}  # the sweep's --limit is its number of dev prompts
    benchmark = re.match(r"python3? benchmarks/(\w+\.py)\b", command)
    if benchmark and benchmark.group(1) in BENCHMARKS:
        for option, most in BENCHMARKS[benchmark.group(1)].items():
            command = _capped(command, option, most)
        return command, {}
    analysis = re.match(r"taskvec (\w+)\b", command)
    if analysis and analysis.group(1) in ANALYSES:
        for option, most in ANALYSES[analysis.group(1)].items():
            command = _capped(command, option, most)
        return _few_dev_prompts(command), {}
    return command, {}


def _few_dev_prompts(command: str) -> str:
    """layer=auto sweeps DEV_PROMPTS dev prompts (num_dev), which --limit does not cap."""
    if "--model_args" in command:
        return re.sub(r"--model_args\s+(\S+)", rf"--model_args \1,num_dev={DEV_PROMPTS}", command)
    return f"{command} --model_args pretrained=embedded,num_dev={DEV_PROMPTS}"


ALL = [(doc, *step) for doc in DOCS for step in steps(doc)]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of this checkout's files (tracked and untracked, not ignored), a fresh cache, a clean PATH."""
    base = tmp_path_factory.mktemp("docs")
    repo = base / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    outer = os.path.dirname(sys.executable)  # this test's own environment must not leak into the commands
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != outer)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "LM_EVAL_TASKVEC_CACHE")}
    env.setdefault("OMP_NUM_THREADS", "1")  # on a busy 2-core CI machine, 2 threads per process run 3-15x slower
    env |= {
        "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{path}",
        "VIRTUAL_ENV": str(repo / ".venv"),
        "LM_EVAL_TASKVEC_CACHE": str(base / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }  # the CPU, as on CI
    report = base / "docs_run.md"
    report.write_text("# Every command of the docs, run as the docs test ran it\n")
    print(f"\ndocs test: commands run in {repo}, report in {report}")
    return repo, env, report


@pytest.mark.slow
@pytest.mark.parametrize("doc, where, kind, code", ALL, ids=[f"{where}" for _, where, _, _ in ALL])
def test_documented_command_runs(checkout, doc, where, kind, code):
    repo, env, report = checkout
    if kind == "shell" and code.startswith("make test"):
        pytest.skip("make test is the command running this test")
    if kind == "shell" and _needs_hub(code) and not _hub_reachable():
        pytest.skip("needs the Hugging Face Hub, which is unreachable or switched off (HF_HUB_OFFLINE)")
    extra = {}
    if kind == "python":
        script = repo / f".docs_{where.replace('/', '_').replace(':', '_')}.py"
        code = code if "limit=" in code else code.replace("simple_evaluate(", f"simple_evaluate(limit={LIMIT}, ")
        script.write_text(code.replace('model_args="', f'model_args="num_dev={DEV_PROMPTS},'))
        command = f"python {script.name}"
    else:
        command, extra = _limited(code)
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "-c", command], cwd=repo, env=env | extra, capture_output=True, text=True, timeout=TIMEOUT
    )
    seconds = time.perf_counter() - started
    logs = [
        line
        for line in done.stderr.replace("\r", "\n").splitlines()  # progress bars: the finished ones only
        if line.strip() and ("%|" not in line or "100%|" in line)
    ]
    tail = "\n".join(logs)[-2500:] + "\n" + done.stdout[-2500:]  # what it logged, then what it printed
    with report.open("a") as f:
        f.write(
            f"\n## {where} ({seconds:.0f} s, exit {done.returncode})\n\n"
            f"    {' '.join(f'{k}={v}' for k, v in extra.items())}"
            f"{' ' if extra else ''}{command}\n\n```\n{tail}\n```\n"
        )
    assert done.returncode == 0, f"{command} failed:\n{tail}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    """Every relative link and image of the document points at a file (and heading) that exists."""
    text = re.sub(r"^```.*?^```", "", (ROOT / doc).read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = ((ROOT / doc).parent / path).resolve() if path else ROOT / doc
        if not file.exists() or anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"{doc}: links that do not resolve: {broken}"


def test_every_page_is_linked_from_the_readme():
    more = (ROOT / "README.md").read_text().partition("## Where to read more")[2]
    unlisted = [p for p in _pages() if f"]({p})" not in more]
    assert not unlisted, f"pages the README's 'Where to read more' does not link: {unlisted}"
