.PHONY: setup demo test test-transformers bench lint

setup:
	bash scripts/setup.sh

# Main job: convert SmolLM2-135M-Instruct to CoMeT (cached), read a 32k-token input, generate.
demo: setup
	.venv/bin/python -m scripts.long_context_demo

test: setup
	.venv/bin/python -m pytest -q tests

# transformers' own model, generation and config test mixins on tiny CoMeT models, taken from the installed release's
# tests/ (TRANSFORMERS_SRC=<checkout of that version>, else its tagged source archive, downloaded once); ARGS for pytest.
test-transformers: setup
	bash scripts/transformers_conformance.sh $(ARGS)

bench: setup
	.venv/bin/python -m benchmarks.comet_scaling --output-dir results/benchmarks/runs/$$(date +%Y%m%d-%H%M%S)

lint: setup
	.venv/bin/ruff check .
