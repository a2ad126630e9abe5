"""benchmarks/gpu_check.sh, the GPU check of issue 22, on the CPU with tiny models (so that it cannot rot before a
GPU is lent), and its wheels manifest: everything lm-eval and this package need that the GPU machine lacks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # a dataclass looks itself up there
spec.loader.exec_module(gpu_check)

GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
GPU_PYTHON |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
GPU_PYTHON |= {"platform_python_implementation": "CPython", "os_name": "posix"}
CASES = [
    "stock hf, regular",
    "hf-taskvec regular",
    "hypothesis, per-document S",
    "hypothesis, shared S",
    "baseline",
    "3 modes, separate runs",
    "3 modes, one model (shared S)",
    "hypothesis on the dev split",
    "full sweep (all blocks, dev split)",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable, "OUT": str(out)}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    return done, out


def requirements(name: str, extras=()) -> list[Requirement]:
    """What the installed distribution ``name`` requires on the GPU machine's Python (with ``extras``)."""
    found = []
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(GPU_PYTHON | {"extra": e}) for e in ("", *extras)):
            found.append(req)
    return found


def test_every_check_passes_on_the_cpu(run):
    done, out = run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["summary"]["hard_failures"] == 0 and not report["summary"]["skipped"]
    sections = {(s["kind"], s["model"]) for s in report["sections"]}
    for arch in ("llama", "gemma3"):
        for dtype in ("float32", "bfloat16"):
            assert ("invariants", f"{arch} {dtype} sdpa") in sections
        assert ("bench", f"{arch} bfloat16 sdpa") in sections
    for section in report["sections"]:
        assert "error" not in section, section.get("error")
        if section["kind"] == "invariants":
            failed = [(c["name"], c["detail"]) for c in section["checks"] if c["status"] != "PASS"]
            assert not failed, f"{section['model']}: {failed}"
            assert len(section["checks"]) >= 20 and {"blocks", "params", "seconds", "peak_gib"} <= set(section)
            hard = {c["name"] for c in section["checks"] if c["hard"]}
            assert "regular generate_until equals stock HFLM" in hard  # hard in both precisions
        else:
            assert list(section["cases"]) == CASES
            for row in section["cases"].values():
                assert row["seconds"] > 0 and row["x_stock"] > 0 and row["peak_mib"] >= 0
            assert section["cases"]["stock hf, regular"]["x_stock"] == 1.0 and section["sweep_over_hypothesis"] > 0
    assert {"python", "torch", "transformers", "lm-eval", "datasets", "requirement_problems"} <= set(
        report["environment"]
    )
    text = (out / "gpu_check.txt").read_text()
    assert "== summary" in text and text.strip().splitlines()[-1].startswith("RESULT: passed")
    assert (out / "gpu_check.log").read_text().count("RESULT: passed") == 1


def test_the_extraction_paths_both_ran(run):
    """Llama takes the 4D-mask branches, Gemma's short sliding window the KV-cache prefix; both are forced too."""
    report = json.loads((run[1] / "gpu_check.json").read_text())
    paths = {
        (s["model"].split()[0], c["values"]["path"])
        for s in report["sections"]
        if s["kind"] == "invariants"
        for c in s["checks"]
        if "path" in c["values"]
    }
    assert ("llama", "4D-mask branches (bool)") in paths and ("llama", "KV-cache prefix") in paths
    assert ("gemma3", "KV-cache prefix") in paths


def test_the_manifest_carries_what_the_gpu_machine_lacks():
    """Our requirements and theirs, recursively: each is on the GPU machine, or a carried wheel, or not needed."""
    pins = gpu_check.manifest()
    todo, seen, missing = requirements("lm-eval-taskvec"), set(), []  # pyproject.toml's, as installed
    while todo:
        req = todo.pop()
        name, key = gpu_check.canonical(req.name), (gpu_check.canonical(req.name), frozenset(req.extras))
        if name in gpu_check.GPU_MACHINE_PACKAGES or name in gpu_check.NOT_CARRIED or key in seen:
            continue
        seen.add(key)
        if name not in pins:
            missing.append(str(req))
            continue
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} is not met by {name}=={pins[name]}"
        todo += requirements(name, req.extras)
    assert not missing, f"neither on the GPU machine nor carried: {missing}"
    carried = {name for name, _ in seen}
    assert carried == set(pins), f"carried but required by nothing: {set(pins) - carried}"
    assert not {"torch", "transformers", "accelerate"} & set(pins)  # the machine's own


def test_every_module_the_check_imported_is_on_the_gpu_machine_or_carried(run):
    """Modules imported in the CPU run come from a carried wheel, a package of the machine or one of their
    requirements (which the machine's versions bring along), or this checkout."""
    imported = json.loads((run[1] / "gpu_check.json").read_text())["imported_distributions"]
    allowed, todo = set(gpu_check.manifest()) | {"lm-eval-taskvec"}, list(gpu_check.GPU_MACHINE_PACKAGES)
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            todo += [gpu_check.canonical(r.name) for r in requirements(name)]
        except metadata.PackageNotFoundError:
            pass
    assert not [d for d in imported if d not in allowed], f"imported, neither there nor carried: {imported}"


def test_downloaded_wheels_match_the_manifest():
    folder = ROOT / "benchmarks" / "gpu_wheels"
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        pytest.skip("no wheels downloaded (bash benchmarks/fetch_gpu_wheels.sh)")
    found = {gpu_check.canonical(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels}
    assert found == gpu_check.manifest()
    assert sum(w.stat().st_size for w in wheels) < 32 * 2**20  # the device tool carries 64 MiB with the checkout
