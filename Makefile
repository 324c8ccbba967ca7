# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each installs the virtualenv (.venv) first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SPACE  ?= search_spaces/digits_resnet.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=   # e.g. --quick, or -k latency
DEMO_ARGS ?= --resume   # e.g. --study another-name --trials 40

.PHONY: install test demo lint bench ui cluster-search clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -X faulthandler tests/main.py $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/autoprune search $(SPACE) $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check autoprune tests benchmarks examples
	$(VENV)/bin/mypy autoprune

bench: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

ui: install
	$(VENV)/bin/autoprune ui

cluster-search: install
	$(VENV)/bin/autoprune submit $(SPACE) --wait $(if $(ADDRESS),--address $(ADDRESS),)

clean:
	rm -rf $(VENV) build *.egg-info
