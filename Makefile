# The two commands: `make demo` runs a real PySpark job through stoker on the local backend;
# `make test` runs every kind of test (`make test-long` adds 8 slower second cases). Both install what they need through scripts/setup.sh.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/stoker
VENV := $(CACHE)/venv-pyspark-4.2.0
JAR := spark-plugin/target/stoker-spark-plugin.jar


.PHONY: bench bench-quick bench-sizing bench-scale bench-fairness chaos chaos-quick
.PHONY: setup demo test test-all test-long test-rust test-plugin test-e2e test-testbed lint image

setup:
	scripts/setup.sh

# The demo uses the local backend only: no Kubernetes test bed build.
demo:
	STOKER_SETUP_TESTBED=0 scripts/setup.sh
	scripts/demo.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test-rust:
	cargo test --workspace --locked

test-plugin:
	cd spark-plugin && mvn -B -q test

# tests/e2e on the local backend and the Kubernetes test bed (tests/testbed with the process
# kubelet, test_testbed.py), which scripts/setup.sh builds: every kind of scenario once. The tests
# marked `long` (a second, slower case of a kind this already runs: the same scenario on the other
# backend, or a slower variant; about 8 minutes) run in `make test-long`; `make test-all` runs both.
test-e2e:
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python -m pytest -v -p no:cacheprovider --durations=25 -m "not long" tests/e2e

test-long: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python -m pytest -v -p no:cacheprovider --durations=10 -m long tests/e2e

test-all: test test-long

# Only the test bed's own tests (about 2 minutes).
test-testbed: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python -m pytest -v -p no:cacheprovider tests/e2e/test_testbed.py

test: setup lint test-rust test-plugin test-e2e

# The image of deploy/Dockerfile built whole with buildah (scripts/image.sh --from-source: its
# build stage runs `cargo build --release` in the container, about 11 minutes on 2 cores), then
# started by tests/e2e/test_image.py. `make test` runs that test too, on an image whose build
# stage is replaced by target/debug/stoker (seconds).
image: setup
	scripts/image.sh build --from-source --tag localhost/stoker:0.1.0
	STOKER_IMAGE=localhost/stoker:0.1.0 STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) \
	  $(VENV)/bin/python -m pytest -v -p no:cacheprovider tests/e2e/test_image.py

# Benchmarks (not part of `make test`): stoker against Spark's built-in Kubernetes backend.
bench:
	scripts/bench.sh

bench-quick:
	scripts/bench.sh --quick

# Issue 14's five runs (tests/bench/bench_sizing.py, not part of `make test`): heap_hog.py (512m
# executors, 600 MiB per task in the heap) 5 times under stoker with one spark.stoker.sizing.key
# and 5 times under Spark's built-in Kubernetes backend on the test bed; prints the table and
# writes target/bench-sizing/sizing.md. About 5 minutes.
bench-sizing: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python tests/bench/bench_sizing.py --out target/bench-sizing

# Issue 12's scale figure (tests/bench/bench_scale.py, not part of `make test`): one stoker, 100
# applications x 100 executor pods (light gRPC drivers) on the process-less kubelet, one forced
# re-list (410 Gone) under that load, stoker's RSS and CPU, then a second ramp and unregister (is the
# memory reused?); prints the table and writes target/bench-scale/scale.md. Exits non-zero when a
# loss figure is not 0. About 11 minutes.
bench-scale: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python tests/bench/bench_scale.py --out target/bench-scale --again

# Issue 13's fairness benchmark (tests/bench/bench_fairness.py, not part of `make test`): three real
# Spark drivers with dynamic allocation (A asks up to 200 executors at 0 s, B and C up to 100 at 60 s
# and 120 s) under a ResourceQuota of 60 pods, once through Spark's built-in backend and once
# through stoker with a queue file of capacity 60; time until every application is within 10% of
# its fair share, Jain's index, first executors, pending pods, quota refusals, API requests; prints
# the table and writes target/bench-fairness/fairness.md. About 12 minutes. `--scenario two`: the
# earlier two static applications under a bound of 20.
bench-fairness: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python tests/bench/bench_fairness.py --out target/bench-fairness

# The fault matrix (tests/chaos/chaos.py, not part of `make test`, which runs its quick variant
# tests/e2e/test_chaos.py, cases a-e): every case 10 times (ramps of 500 executor pods in a-e, 200
# adopted pods in f, a real 3-executor shuffle job in g-j, i: its node lost mid-job, j: the leader
# of two stoker replicas SIGKILLed mid-job; about 73 minutes); prints the table and writes
# target/chaos/chaos.md. Exits non-zero when a loss figure is not 0. chaos-quick: each case once,
# N = 60 (f: 200, g-j: 3), about 8 minutes.
chaos: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python tests/chaos/chaos.py --out target/chaos

chaos-quick: setup
	STOKER_PLUGIN_JAR=$(CURDIR)/$(JAR) $(VENV)/bin/python tests/chaos/chaos.py --quick --out target/chaos
