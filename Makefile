# The two entry points the README promises. Both do all set-up first (idempotent).
#   make demo   - the main job
#   make test   - lint + type checks + Rust tests + the pytest suite
.PHONY: setup demo test lint rust-test fuzz py-test bench bench-setup wheel wheel-test clean

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

py-test: setup
	$(VENV)/pytest -q tests

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
