# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   set up, mount two sets of fake devices, migrate between them
#   make test   set up, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench soak clean fresh-machine

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/setup
	bash .ci/setup $(VENV)
	touch $@

demo: setup
	$(PY) -m fakevfio.demo

# -n auto: one pytest-xdist worker per core (the suite is mostly waiting on mounts, QEMU
# and guests; on 2 cores this halves its time). PYTEST_ARGS adds options, e.g. -n 0.
PYTEST_ARGS ?=
test: setup
	bash .ci/setup-qemu
	$(PY) -m pytest -n auto $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo

# The table goes to stdout and, with the plot (matplotlib: pip install -e '.[bench]'),
# to BENCH_OUT/table.txt and BENCH_OUT/plot.png.
BENCH_OUT ?= bench-results
bench: setup
	$(PY) -m benchmarks --out $(BENCH_OUT)

# The chaos soak (issue 18): up to SOAK_ROUNDS migrations with random faults, bounded
# in time, then SOAK_FUZZ fuzzed VFIO/iommufd ioctls under fakevfio run; prints both
# tables and fails on a lost source state, a hang, a supervisor crash or an errno
# outside the kernel's set.
SOAK_ROUNDS ?= 300
SOAK_TIME ?= 2400
SOAK_FUZZ ?= 100000
soak: setup
	$(PY) -m benchmarks.soak --rounds $(SOAK_ROUNDS) --time-limit $(SOAK_TIME) --fuzz-ioctls $(SOAK_FUZZ)

# Not part of .ci/run: debootstraps clean Debian 12 and 13 root filesystems (cached under
# /var/cache/fakevfio-rootfs) and runs `make demo` in each (FRESH_ARGS="--test" adds
# `make test`); needs root and takes minutes. See .ci/fresh-machine. FRESH_ARGS="--podman"
# does it in podman containers and builds and runs examples/ci/Dockerfile too
# (.ci/containers, docs/containers.md).
fresh-machine:
	bash .ci/fresh-machine $(FRESH_ARGS)

clean:
	rm -rf $(VENV)
