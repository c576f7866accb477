"""Real tokenizers and chat templates, offline: fetch, convert once, cache, load.

Owns the pinned sources of shared/TOKENIZERS.md (llama.cpp's vocab-only GGUFs inside the
llama-cpp-python sdist, Mistral's SentencePiece model inside mistral_common) and the chat-template
fixtures in training/templates/. Knows nothing about rendering, training or the service.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from training.offline_cache import CacheFetchError, cache_base, file_lock, pip_download_pinned

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_GGUF_MEMBER_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/models/"
_MISTRAL_SPM_MODEL = "mistral_instruct_tokenizer_240323.model.v3"
_TEMPLATES_DIR = Path(__file__).parent / "templates"
# Bump when the conversion below changes, so cached folders are rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "loraloop-tokenizer.json"


class TokenizerFetchError(CacheFetchError):
    """The pinned source could not be downloaded, verified or converted."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a family's tokenizer comes from and which chat template it is paired with.

    `template` names a fixture in training/templates/ (without `.jinja`); None keeps the template
    shipped inside the source (or none at all). `base_family` derives the vocabulary from another
    family's cached folder instead of a source file.
    """

    family: str
    description: str
    gguf_file: str | None = None
    mistral_model: str | None = None
    base_family: str | None = None
    template: str | None = None
    added_tokens: tuple[str, ...] = ()
    has_chat_template: bool = True

    def fingerprint(self) -> str:
        template_text = _template_text(self.template) if self.template else ""
        payload = json.dumps(
            [_CONVERSION_VERSION, self.gguf_file, self.mistral_model, self.base_family,
             template_text, list(self.added_tokens)]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


FAMILIES: dict[str, TokenizerSpec] = {
    spec.family: spec
    for spec in (
        TokenizerSpec("qwen2", "Qwen2/2.5 byte-level BPE, ChatML template from the GGUF (main family)",
                      gguf_file="ggml-vocab-qwen2.gguf"),
        TokenizerSpec("qwen35", "Qwen3.5 vocabulary, ChatML template from the GGUF",
                      gguf_file="ggml-vocab-qwen35.gguf"),
        TokenizerSpec("phi3", "Phi-3 SentencePiece; template emits BOS and the assistant header after "
                              "every user turn, drops system messages", gguf_file="ggml-vocab-phi-3.gguf"),
        TokenizerSpec("llama3", "Llama-3 tiktoken-style BPE + Llama-3-style template fixture",
                      gguf_file="ggml-vocab-llama-bpe.gguf", template="llama3"),
        TokenizerSpec("llama2", "Llama-2 SentencePiece + [INST] template fixture",
                      gguf_file="ggml-vocab-llama-spm.gguf", template="llama2"),
        TokenizerSpec("gpt2", "GPT-2 byte-level BPE, no chat template (template-free paths)",
                      gguf_file="ggml-vocab-gpt-2.gguf", has_chat_template=False),
        TokenizerSpec("qwen3-reasoning", "qwen2 vocabulary + <think> tokens + a Qwen3-style template "
                                         "that strips earlier reasoning from history",
                      base_family="qwen2", template="qwen3_reasoning",
                      added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>",
                                    "<tool_response>", "</tool_response>")),
        TokenizerSpec("mistral", "Mistral v3 SentencePiece from mistral_common + [INST] template fixture "
                                 "(mistral_common is the parity reference)",
                      mistral_model=_MISTRAL_SPM_MODEL, template="mistral_v3"),
    )
}


def cache_root() -> Path:
    """`$LORALOOP_CACHE_DIR/tokenizers`, else `~/.cache/loraloop/tokenizers`."""
    return cache_base() / "tokenizers"


def tokenizer_dir(family: str) -> Path:
    """The cached tokenizer folder of `family`, fetched and converted first when missing."""
    spec = _spec(family)
    target = cache_root() / family
    if _is_current(target, spec):
        return target
    with file_lock(cache_root()):
        if not _is_current(target, spec):
            _build(spec, target)
    return target


def load_tokenizer(family_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a family name (see FAMILIES) or a tokenizer/model folder."""
    name = os.fspath(family_or_path)
    folder = tokenizer_dir(name) if name in FAMILIES else Path(name)
    return AutoTokenizer.from_pretrained(folder)


def _spec(family: str) -> TokenizerSpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}") from None


def _template_text(name: str) -> str:
    return (_TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _is_current(target: Path, spec: TokenizerSpec) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint()
    except (OSError, json.JSONDecodeError):
        return False


def _build(spec: TokenizerSpec, target: Path) -> None:
    if spec.gguf_file:
        tokenizer = _from_gguf(spec.gguf_file)
    elif spec.mistral_model:
        tokenizer = _from_mistral_common(spec.mistral_model)
    elif spec.base_family:
        base = _spec(spec.base_family)
        base_dir = cache_root() / base.family
        if not _is_current(base_dir, base):
            _build(base, base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    else:
        raise TokenizerFetchError(f"family {spec.family!r} names no source")
    if spec.added_tokens:
        tokenizer.add_tokens(list(spec.added_tokens), special_tokens=False)
    if spec.template:
        tokenizer.chat_template = _template_text(spec.template)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.family}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(
            {"family": spec.family, "fingerprint": spec.fingerprint(), "description": spec.description}
        ))
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _from_gguf(gguf_file: str) -> PreTrainedTokenizerBase:
    gguf_dir = cache_root() / "_gguf"
    if not (gguf_dir / gguf_file).is_file():
        _extract_gguf(_llama_cpp_sdist(), gguf_file, gguf_dir)
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)


def _llama_cpp_sdist() -> Path:
    try:
        return pip_download_pinned(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", LLAMA_CPP_SDIST,
                                   LLAMA_CPP_SDIST_SHA256, cache_root() / "_downloads", source=True)
    except CacheFetchError as error:
        raise TokenizerFetchError(str(error)) from error


def _extract_gguf(archive: Path, gguf_file: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(_GGUF_MEMBER_PREFIX + gguf_file)
        except KeyError:
            raise TokenizerFetchError(f"{gguf_file} is not in {archive.name}") from None
        source = tar.extractfile(member)
        if source is None:
            raise TokenizerFetchError(f"{gguf_file} in {archive.name} is not a regular file")
        staging = out_dir / f".{gguf_file}.part"
        with source, open(staging, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.replace(staging, out_dir / gguf_file)


def _from_mistral_common(model_name: str) -> PreTrainedTokenizerBase:
    from transformers import LlamaTokenizer

    try:
        import mistral_common
    except ImportError as error:
        raise TokenizerFetchError("the mistral family needs the mistral_common package") from error
    source = Path(mistral_common.__file__).parent / "data" / model_name
    if not source.is_file():
        raise TokenizerFetchError(f"{source} is missing from mistral_common")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(source, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tokenizer_files",
                                     description="Fetch and convert loraloop's offline tokenizers.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch and convert every family (or one) into the cache")
    fetch.add_argument("--family", choices=sorted(FAMILIES), help="only this family")
    commands.add_parser("list", help="list the families and their cached folders")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for family in [args.family] if args.family else list(FAMILIES):
            print(f"{family}: {tokenizer_dir(family)}")
    else:
        for family, spec in FAMILIES.items():
            print(f"{family:16} {spec.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
