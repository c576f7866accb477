"""The base model's own greedy answers to the built-in anchor prompts, computed once per base model.

Owns the cache file (`<offline cache>/anchors/<key>.json`, the key hashing the model folder, its
config's mtime and the prompt list, so a changed model or list is recomputed) and `anchor_answers`,
which reads it or generates the answers with a loaded base model and writes it atomically.
`loraloop models fetch` fills it right after converting the model, so the first online update does
not pay for it. Knows nothing of training or the service.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.generate import greedy_answers, user_prompt
from training.offline_cache import cache_base
from training.probes import anchor_prompts

__all__ = ["ANCHOR_MAX_NEW_TOKENS", "anchor_answers", "anchor_cache_file"]

ANCHOR_MAX_NEW_TOKENS = 48


def anchor_cache_file(model_dir: Path) -> Path:
    model_dir = Path(model_dir).resolve()
    stamp = json.dumps([str(model_dir), (model_dir / "config.json").stat().st_mtime_ns, list(anchor_prompts()),
                        ANCHOR_MAX_NEW_TOKENS])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:20]
    return cache_base() / "anchors" / f"{model_dir.name}-{key}.json"


def anchor_answers(model_dir: Path, load_model: Callable[[], Any], tokenizer: Any) -> list[str]:
    """The cached answers, or the greedy answers of `load_model()` (the base, no adapter), cached."""
    cache = anchor_cache_file(model_dir)
    prompts = anchor_prompts()
    try:
        answers = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(answers, list) and len(answers) == len(prompts):
            return [str(answer) for answer in answers]
    except (OSError, ValueError):
        pass
    answers = greedy_answers(load_model(), tokenizer, [user_prompt(prompt) for prompt in prompts],
                             max_new_tokens=ANCHOR_MAX_NEW_TOKENS)
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(answers), encoding="utf-8")
    os.replace(staging, cache)
    return answers
