# The one gate, the same locally and in CI (.ci/run calls `make check`).
.PHONY: check fmt clippy test doc-test soak build run fixtures demo-model clients docker-test

CARGO ?= cargo

check: fmt clippy test doc-test soak

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test:
	$(CARGO) nextest run --workspace --locked --no-fail-fast

doc-test:
	$(CARGO) test --workspace --locked --doc

# Two minutes of mixed load on the whole stack (the test model, debug binaries): fails on an
# unexpected answer, resident memory growing over 5 % after warm-up, or descriptors, streams
# and KV caches not back to their start (docs/RELIABILITY.md, "Soak").
soak:
	$(CARGO) build --workspace --locked -q
	target/debug/llorch-soak --spawn-model fixtures/models/tiny --tokenizer-dir models/default \
		--duration-secs 120 --warmup-secs 30 --streams 8 --check

build:
	$(CARGO) build --workspace --release --locked

# Regenerates the committed fixtures (needs Python; see scripts/README.md).
fixtures:
	python3 scripts/gen_tokenizer_corpus.py
	python3 scripts/gen_reference.py
	python3 scripts/gen_sampling_reference.py
	python3 scripts/check_random_model.py

# Retrains the demo model in models/default (~35 min on 2 cores; needs Debian's bible-kjv and
# the venv of scripts/requirements.txt), then its references. See models/default/README.md.
demo-model:
	python3 scripts/train_demo.py
	python3 scripts/gen_reference.py

# The Python clients (official `openai` client tests, gRPC example) against the three real
# services; needs `.ci/setup --test` (the venv) and a built workspace. Run by .ci/run.
clients:
	$(CARGO) build --workspace --all-targets --locked -q
	clients/run.sh

# The container test: builds the image offline (deploy/build-offline.sh) and drives the compose
# stack through its published port (needs Docker and docker-compose; see deploy/test_compose.py).
docker-test:
	python3 deploy/test_compose.py
