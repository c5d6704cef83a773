# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so that pip takes the CPU wheel that these machines keep on local disk,
# instead of resolving a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo-out

# icetk's own package (the reference our icetk tokenizers are checked against) cannot be installed beside
# Ray: it pins protobuf < 3.19 and needs torchvision, whose wheels here load only against torch 2.14.1.
# This second environment takes icetk and cogdata without their pins (--no-deps) and runs their tests.
ICETK_VENV ?= .venv-icetk
ICETK_PY   := $(ICETK_VENV)/bin/python

.PHONY: venv demo test test-fast test-icetk icetk-venv bench clean

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

icetk-venv: $(ICETK_VENV)/.installed

$(ICETK_VENV)/.installed: pyproject.toml
	test -x $(ICETK_PY) || $(PYTHON) -m venv $(ICETK_VENV)
	$(ICETK_PY) -m pip install -q --upgrade pip
	$(ICETK_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(ICETK_PY) -m pip install -q -e ".[dev]"
	$(ICETK_PY) -m pip install -q --no-deps icetk==0.0.7 cogdata==0.0.7 unrar==0.4
	$(ICETK_PY) -m pip install -q filelock requests
	touch $@

# icetk's generated protobuf code runs only on protobuf's pure-Python implementation beside protobuf >= 4
test-icetk: $(ICETK_VENV)/.installed
	PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python $(ICETK_PY) -m pytest -q tests/test_icetk.py

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
	rm -rf $(VENV) $(ICETK_VENV) $(DEMO_OUT) .pytest_cache
