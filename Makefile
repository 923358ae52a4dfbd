.PHONY: setup demo test bench lint

setup:
	bash scripts/setup.sh

# Main job: convert SmolLM2-135M-Instruct to CoMeT (cached), read a 32k-token input, generate.
demo: setup
	.venv/bin/python -m scripts.long_context_demo

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python -m benchmarks.comet_scaling

lint: setup
	.venv/bin/ruff check .
