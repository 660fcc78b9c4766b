# The one gate, the same locally and in CI (.ci/run calls `make check`).
.PHONY: check fmt clippy test doc-test build run fixtures demo-model clients docker-test

CARGO ?= cargo

check: fmt clippy test doc-test

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test:
	$(CARGO) nextest run --workspace --locked --no-fail-fast

doc-test:
	$(CARGO) test --workspace --locked --doc

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
