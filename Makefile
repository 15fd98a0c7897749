# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    fetch + verify the default model, build, serve it on 127.0.0.1:8080
#   make test   fetch the models, check formatting and lints, run every test
CARGO ?= cargo
JOBS ?= 2
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
# Gemma 3 270M (another family, K-quants): the tests run it too.
GEMMA := models/gemma-3-270m-q4_k_m.gguf
ARGS ?=

.PHONY: run test model models build fmt-check clippy bench

model: $(MODEL)

models: $(MODEL) $(GEMMA)

$(MODEL):
	scripts/fetch-model.sh smollm2-135m

$(GEMMA):
	scripts/fetch-model.sh gemma3-270m

build:
	$(CARGO) build --release -j$(JOBS)

run: model build
	target/release/starling serve $(ARGS)

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -j$(JOBS) --all-targets -- -D warnings

test: models fmt-check clippy
	$(CARGO) test -j$(JOBS)

bench: model build
	target/release/starling bench --model $(MODEL) $(ARGS)
