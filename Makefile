# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    fetch + verify the default model, build, serve it on 127.0.0.1:8080
#   make test   fetch the model, check formatting and lints, run every test
CARGO ?= cargo
JOBS ?= 2
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
ARGS ?=

.PHONY: run test model build fmt-check clippy bench

model: $(MODEL)

$(MODEL):
	scripts/fetch-model.sh

build:
	$(CARGO) build --release -j$(JOBS)

run: model build
	target/release/starling serve $(ARGS)

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -j$(JOBS) --all-targets -- -D warnings

test: model fmt-check clippy
	$(CARGO) test -j$(JOBS)

bench: model build
	target/release/starling bench --model $(MODEL) $(ARGS)
