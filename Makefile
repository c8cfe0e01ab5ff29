# The two entry points the README promises. Both do all set-up first (idempotent).
#   make demo   - the main job
#   make test   - lint + type checks + Rust tests + the pytest suite
.PHONY: setup demo test test-heavy lint rust-test fuzz py-test bench bench-setup wheel wheel-test clean

VENV := .venv/bin
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	scripts/setup.sh test,lint,plot

demo: setup
	scripts/demo.sh

lint: setup
	$(VENV)/ruff check python tests benches
	$(VENV)/ruff format --check python tests benches
	$(VENV)/mypy
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -q -- -D warnings

rust-test:
	cargo test -p supermachine-core -q

# The fuzz harnesses (rust/tests/fuzz_*.rs, guest/agent/src/*fuzz*): every corpus entry, then
# FUZZ_SECONDS of random mutations per target. `cargo test` alone gives each target one second.
FUZZ_SECONDS ?= 20
fuzz:
	SUPERMACHINE_FUZZ_SECONDS=$(FUZZ_SECONDS) cargo test -p supermachine-core -q --release --test 'fuzz_*'
	cd guest/agent && SUPERMACHINE_FUZZ_SECONDS=$(FUZZ_SECONDS) cargo test -q --release fuzz

# Two workers: most of the suite's time is guest kernel code, one core per VM on emulating hosts.
# A module's tests stay together on one worker (they share module fixtures, often a booted VM).
# A short base for temporary directories: VM sockets live in them and a unix socket path has
# at most 107 bytes.
PYTEST_WORKERS ?= 2
py-test: setup
	$(VENV)/pytest -q tests -n $(PYTEST_WORKERS) --dist loadfile --durations=30 --basetemp="$$(mktemp -d /tmp/smt.XXXXXX)"

# The heavy tests (minutes each here; see tests/conftest.py), on their own.
test-heavy: setup
	SUPERMACHINE_HEAVY_TESTS=1 $(VENV)/pytest -q tests -m heavy --durations=0

test: lint rust-test py-test

# The distributable wheel in dist/, carrying both guest kernels, the agent and the VMM worker.
wheel: setup
	scripts/build-wheel.sh

# Installs that wheel into a fresh virtualenv outside the checkout, with no guest/ and no C
# compiler on PATH, and runs a VM from it (one boot, then a snapshot and a restore).
wheel-test: setup
	wheel=$$(scripts/build-wheel.sh) && SUPERMACHINE_WHEEL=$$wheel $(VENV)/pytest -q tests/packaging

bench-setup:
	scripts/setup.sh test,lint,bench
	cd benches/peers && ../../$(VENV)/maturin develop --release -q

bench: bench-setup
	PATH="$$(scripts/bench-tools.sh):$$PATH" $(VENV)/pytest benches --benchmark-only --benchmark-columns=min,median,max,rounds --benchmark-sort=name $(BENCH_ARGS)

clean:
	rm -rf target .venv
