# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    build, fetch + verify the default model, serve it on 127.0.0.1:8080
#               (MODEL=NAME picks another model of config/catalog.json, MODEL=PATH a file)
#   make test   fetch the models and test tools, check formatting and lints, run every test
CARGO ?= cargo
JOBS ?= 2
# A model name from config/catalog.json (compiled into the binary), or a GGUF file.
MODEL ?= smollm2-135m
# The default model's file, which the tests use.
SMOL := models/SmolLM2-135M-Instruct.Q4_1.gguf
# Gemma 3 270M (another family, K-quants): the tests run it too.
GEMMA := models/gemma-3-270m-q4_k_m.gguf
ARGS ?=

.PHONY: run test model models test-deps build fmt-check clippy bench

model: build
	@if [ ! -f "$(MODEL)" ]; then target/release/starling models pull $(MODEL); fi

models: $(SMOL) $(GEMMA)

$(SMOL):
	scripts/fetch-model.sh smollm2-135m

$(GEMMA):
	scripts/fetch-model.sh gemma3-270m

build:
	$(CARGO) build --release -j$(JOBS)

run: model
	target/release/starling serve --model $(MODEL) $(ARGS)

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -j$(JOBS) --all-targets -- -D warnings

test: models test-deps fmt-check clippy
	$(CARGO) test -j$(JOBS)

# haproxy and the manifest validator the tests drive (scripts/test-deps.sh).
test-deps:
	scripts/test-deps.sh

bench: model
	target/release/starling bench --model $(MODEL) $(ARGS)
