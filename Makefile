# ctstream: `make demo` and `make test` work on a fresh Debian 12 machine (as
# root); both run scripts/setup.sh first, which is quick when nothing is missing.

VENV := .venv
PY   := $(VENV)/bin/python

.PHONY: setup demo test bench bench-scale bench-pipeline bench-peer bench-config bench-syncookies clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ctstream demo

# Extra pytest arguments: make test PYTEST_ARGS='-k ringbuf -x'
test: setup
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

# Slow and big (about 50 s, 2 GB of kernel memory): a 10M-entry table,
# see bench/README.md "Table scale". Extra arguments: BENCH_ARGS=--quick
bench-scale: setup
	$(PY) bench/table_scale.py $(BENCH_ARGS)

# ctstream run end to end with a real broker (about 4 min): bench/README.md.
bench-pipeline: setup
	$(PY) bench/pipeline.py --variants default,no-archive,lz4 --rounds 2 $(BENCH_ARGS)

# ctstream beside the kernel's nf_conntrack on real traffic, and DESTROY
# delivery against conntrack -E (about 10 min; BENCH_ARGS=--quick about 2 min):
# bench/README.md "Side by side with nf_conntrack". The chart needs matplotlib
# (not a dependency of the package), installed here when it is missing.
bench-peer: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q 'matplotlib>=3.6,<4'
	$(PY) bench/peer.py $(BENCH_ARGS)

# Live configuration (about 2.5 min; BENCH_ARGS=--quick about 65 s): the packet
# path with 0, 100 and 10,000 prefixes beside a8dc806 (a temporary git
# worktree), apply latency in process and through `ctstream config apply`:
# bench/README.md "Live configuration".
bench-config: setup
	$(PY) bench/config_bench.py $(BENCH_ARGS)

# One spoofed SYN flood (hping3 --flood --rand-source), three defences side
# by side: ctstream without and with SYN cookies, the kernel's own cookies
# with nf_conntrack (about 8 min; BENCH_ARGS=--quick about 2.5):
# bench/README.md "SYN cookies".
bench-syncookies: setup
	$(PY) bench/syncookie_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
