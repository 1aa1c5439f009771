# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   set up, mount two sets of fake devices, migrate between them
#   make test   set up, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/setup
	bash .ci/setup $(VENV)
	touch $@

demo: setup
	$(PY) -m fakevfio.demo

test: setup
	bash .ci/setup-qemu
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV)
