# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so that pip takes the CPU wheel that these machines keep on local disk,
# instead of resolving a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: venv demo test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/clipforge demo --out $(DEMO_OUT)

# Two workers: tests that start Ray run one after another on one of them (tests/conftest.py), the rest
# spread over both; most of the suite's time is spent waiting on subprocesses, Ray and ffmpeg.
test: venv
	$(PY) -m pytest -q -x -n 2 --dist loadgroup --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not ray and not slow"

bench: venv
	$(PY) bench/decode.py
	$(PY) bench/shards.py
	$(PY) bench/build.py
	$(PY) bench/scale.py
	$(PY) bench/task_memory.py
	$(PY) bench/tokenize.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
