"""training.tokenizer_files (offline families: fetch, verify, convert, cache) and training.tiny_model."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import training.offline_cache as offline_cache_module
import training.tokenizer_files as tokenizers_module
from training.tiny_model import UnknownArchitecture, build_tiny_model, ensure_tiny_model
from training.tokenizer_files import FAMILIES, TokenizerFetchError, load_tokenizer, tokenizer_dir

REQUIRED_FAMILIES = {"qwen2", "qwen35", "phi3", "llama3", "llama2", "gpt2", "qwen3-reasoning", "mistral"}


def test_every_required_family_is_declared():
    assert REQUIRED_FAMILIES <= set(FAMILIES)


def test_each_family_is_a_fast_tokenizer_with_offsets(family_tokenizer):
    family, tokenizer = family_tokenizer
    assert tokenizer.is_fast
    encoded = tokenizer("Hello wörld 日本 🙂", add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoded["offset_mapping"]) == len(encoded["input_ids"]) > 0
    assert bool(tokenizer.chat_template) == FAMILIES[family].has_chat_template
    assert tokenizer.pad_token_id is not None


@pytest.mark.parametrize(("family", "marker"), [
    ("qwen2", "<|im_start|>"), ("qwen35", "<|im_start|>"), ("phi3", "<|assistant|>"),
    ("llama3", "<|start_header_id|>"), ("llama2", "<s>"), ("qwen3-reasoning", "<|im_start|>"),
    ("mistral", "[INST]"),
])
def test_templates_render_with_single_special_tokens(tokenizer_for, family, marker):
    tokenizer = tokenizer_for(family)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert marker in prompt
    assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_qwen3_reasoning_strips_reasoning_before_the_last_query(tokenizer_for):
    tokenizer = tokenizer_for("qwen3-reasoning")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>\nA"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>s</think>\nB"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<think>r</think>" not in rendered and "<think>s</think>\nB" in rendered
    assert len(tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1


def test_fetch_is_idempotent_and_quick_when_cached():
    folder = tokenizer_dir("qwen2")
    marker = folder / tokenizers_module._MARKER
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert tokenizer_dir("qwen2") == folder
    assert time.perf_counter() - started < 1.0
    assert marker.stat().st_mtime_ns == before


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path))
    assert tokenizers_module.cache_root() == tmp_path / "tokenizers"
    monkeypatch.delenv("LORALOOP_CACHE_DIR")
    assert tokenizers_module.cache_root() == Path.home() / ".cache" / "loraloop" / "tokenizers"


def test_a_download_with_the_wrong_sha256_is_refused_and_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path))
    archive = tmp_path / "tokenizers" / "_downloads" / tokenizers_module.LLAMA_CPP_SDIST

    def fake_pip(command, **_):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-binary" in command
        archive.write_bytes(b"not the pinned archive")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(offline_cache_module.subprocess, "run", fake_pip)
    with pytest.raises(TokenizerFetchError, match="sha256"):
        tokenizers_module._llama_cpp_sdist()
    assert not archive.exists()


def test_only_the_requested_gguf_is_extracted(tmp_path):
    archive = tmp_path / "sdist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in [("ggml-vocab-qwen2.gguf", b"qwen"), ("ggml-vocab-gpt-2.gguf", b"gpt2")]:
            info = tarfile.TarInfo(tokenizers_module._GGUF_MEMBER_PREFIX + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "gguf"
    tokenizers_module._extract_gguf(archive, "ggml-vocab-qwen2.gguf", out)
    assert [p.name for p in out.iterdir()] == ["ggml-vocab-qwen2.gguf"]
    assert (out / "ggml-vocab-qwen2.gguf").read_bytes() == b"qwen"
    with pytest.raises(TokenizerFetchError):
        tokenizers_module._extract_gguf(archive, "ggml-vocab-missing.gguf", out)


def test_load_tokenizer_accepts_a_folder(tmp_path):
    assert load_tokenizer(str(tokenizer_dir("gpt2"))).vocab_size == 50257
    with pytest.raises(KeyError):
        tokenizer_dir("no-such-family")


# --- tiny model ---------------------------------------------------------------------------------------


def test_tiny_model_covers_the_tokenizer_and_ties_embeddings(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config.vocab_size >= len(tokenizer) and config.tie_word_embeddings
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(name).get_dtype() for name in names} == {"F32"}
    assert not any(name.startswith("lm_head") for name in names)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) < 20_000_000


def test_tiny_model_vocab_covers_added_tokens_and_is_not_rebuilt(tmp_path):
    started = time.perf_counter()
    folder = build_tiny_model(tmp_path / "tiny", family="qwen3-reasoning", arch="llama", seed=3)
    assert time.perf_counter() - started < 60
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] > max(tokenizer.added_tokens_decoder) and config["vocab_size"] % 64 == 0
    assert config["model_type"] == "llama"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(folder, family="qwen3-reasoning") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UnknownArchitecture):
        build_tiny_model(tmp_path / "bad", arch="gpt9")
