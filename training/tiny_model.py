"""Tiny random-init causal LMs for tests and the demo, paired with a real offline tokenizer.

Builds a Qwen2 or Llama architecture from a config (no hub), float32 safetensors, tied embeddings,
with the tokenizer saved alongside so the folder loads like any model path. Knows nothing about
training, serving or the service.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from training.tokenizer_files import load_tokenizer

_ARCHITECTURES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
_MARKER = "loraloop-tiny-model.json"
_VOCAB_MULTIPLE = 64


_DEFAULT_NUM_HEADS = 2


class UnknownArchitecture(ValueError):
    """The requested architecture is not one the tiny-model factory builds."""


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "qwen2",
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,  # head_dim 32: vLLM's CPU attention serves head sizes >= 32 only
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Save a random-init causal LM (float32 safetensors) and `family`'s tokenizer into `out_dir`.

    The vocabulary is len(tokenizer) (added tokens included) rounded up to a multiple of 64, so every
    id the tokenizer can produce has an embedding row. Written to a temporary sibling folder and
    renamed into place, so a concurrent reader never sees a half-written model.
    """
    if arch not in _ARCHITECTURES:
        raise UnknownArchitecture(f"arch must be one of {sorted(_ARCHITECTURES)}, got {arch!r}")
    out = Path(out_dir)
    tokenizer = load_tokenizer(family)
    config_class, model_class = _ARCHITECTURES[arch]
    config = config_class(
        vocab_size=_covering_vocab_size(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Like a real chat model's generation_config: serving stops at the template's end-of-turn token
    # (which training labels), not only at the tokenizer's EOS (for qwen2: <|im_end|>, <|endoftext|>).
    stop_ids = [*end_of_turn_ids(tokenizer), tokenizer.eos_token_id]
    model.generation_config.eos_token_id = list(dict.fromkeys(i for i in stop_ids if i is not None))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        build = {"family": family, "arch": arch, "hidden_size": hidden_size, "num_layers": num_layers,
                 "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                 "intermediate_size": intermediate_size, "seed": seed}
        (staging / _MARKER).write_text(json.dumps(build))
        _make_world_readable(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_tiny_model(out_dir: str | os.PathLike[str], family: str = "qwen2") -> Path:
    """`out_dir` holding a tiny model for `family`; built only when no complete one is there."""
    out = Path(out_dir)
    marker = out / _MARKER
    if marker.is_file() and (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        try:
            built = json.loads(marker.read_text())
            if built.get("family") == family and built.get("num_heads") == _DEFAULT_NUM_HEADS:
                return out
        except json.JSONDecodeError:
            pass
    arch = "llama" if family in {"llama2", "llama3", "mistral", "phi3"} else "qwen2"
    return build_tiny_model(out, family=family, arch=arch)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token that closes an assistant turn in the tokenizer's chat template (the first
    special token rendered after the assistant's content), or [] without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "loraloop-end-of-turn-probe"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = str(text)[str(text).index(marker) + len(marker) :]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return [i for i in tokenizer(after, add_special_tokens=False).input_ids if i in special][:1]


def _make_world_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _covering_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    highest_id = max([len(tokenizer) - 1, *tokenizer.added_tokens_decoder.keys()])
    needed = highest_id + 1
    return -(-needed // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
