# Two entry points for a fresh machine:
#   make reproduce   set up .venv, run the main experiment for this machine, write tables/plots
#   make test        set up .venv, run the default (CPU-fast) test suite
# On a GPU machine install your CUDA build of torch into .venv first, or set TORCH_SPEC.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# The CPU wheel; an unpinned torch from PyPI would pull gigabytes of CUDA packages.
TORCH_SPEC  ?= torch==2.13.0
RESULTS     ?= results
# The main job's experiments: inference speed, and the quality proxy (3 seeds, trained here with
# the tiny preset on a 2-core CPU; on a GPU the proxy preset trains for longer, see README).
SPECS       ?= experiments/inference_speed.yaml experiments/quality.yaml
# CPU numerics pinned so that records can reproduce (CPU-only machines; GPU machines run as they
# are; the quality proxy's full training does not yet repeat run to run, see README):
# ATen's AVX2 kernels; MKL's COMPATIBLE branch, the one MKL honours on every x86 CPU (it ignores
# MKL_CBWR=AVX2 on AMD and runs CNR:AUTO there: other GEMM code than on an Intel Xeon), without
# dynamic thread counts; oneDNN capped at AVX2 (the quality proxy does not use it on CPU:
# repro.quality.proxy.portable_cpu_kernels); a fixed thread count. Records carry these settings
# (hardware.cpu_numerics); check-reproduce prints what it compared and why it passed.
CPU_NUMERICS ?= ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE MKL_DYNAMIC=FALSE ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

.PHONY: venv reproduce check-reproduce test test-gpu bench bench-pytest report clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,serve]"
	touch $@

venv: $(VENV)/.installed

## Main job: run the experiments for this machine (tiny presets on CPU, 5B / proxy on CUDA),
## then regenerate every table and plot and the paper comparison.
reproduce: venv
	@numerics=$$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '$(CPU_NUMERICS)')"); \
	for spec in $(SPECS); do echo "== $$spec"; env $$numerics $(PY) -m repro run $$spec --results $(RESULTS) || exit 1; done
	$(MAKE) --no-print-directory report

## A fresh `make reproduce` into a scratch folder, compared with the committed CPU records
## (quality metrics: 95% intervals over seeds overlap; speed within 3x unless flagged busy):
## see repro/reproduce_check.py.
check-reproduce: venv
	rm -rf .cache/check_reproduce
	$(MAKE) --no-print-directory reproduce RESULTS=.cache/check_reproduce
	$(PY) -m repro.reproduce_check --fresh .cache/check_reproduce --committed results

report: venv
	$(PY) -m repro report --results $(RESULTS)
	$(PY) paper_tables.py --results $(RESULTS) --out $(RESULTS)/tables/paper_vs_measured.md

## Default test suite: CPU, fast; GPU tests are skipped without CUDA.
test: venv
	$(PY) -m pytest -q -m "not slow"

test-gpu: venv
	$(PY) -m pytest -q -m gpu

## Benchmarks (ratios measured in one run): GEMM roofline inputs, NVFP4 kernels, quantized
## linears (speedup_vs_bf16), inference FPS (speedup_vs_baseline).
bench: venv
	$(PY) -m repro run experiments/gemm_throughput.yaml --results $(RESULTS)
	$(PY) -m repro run experiments/nvfp4_kernels.yaml --results $(RESULTS)
	$(PY) -m repro run experiments/quant_linear.yaml --results $(RESULTS)
	$(PY) -m repro run experiments/inference_speed.yaml --results $(RESULTS)
	$(MAKE) --no-print-directory bench-pytest
	$(MAKE) --no-print-directory report

## pytest-benchmark suite (benchmarks/, never part of `make test`): NVFP4 quantize/dequantize, KV
## cache write+read, attention, one DiT block, one decoder block per decoder, one training step.
## CPU: tiny sizes; CUDA: 5B shapes too. Writes $(RESULTS)/benchmarks/<hardware-tag>/pytest_benchmark.json
## and saves the run under .benchmarks/<hardware-tag>/ so a later run can compare against it:
##   make bench-pytest BENCH_ARGS=--benchmark-compare           (against the last saved run)
##   make bench-pytest BENCH_ARGS="--benchmark-compare=0001 --benchmark-compare-fail=median:25%"
BENCH_ARGS  ?=
bench-pytest: venv
	@tag=$$($(PY) -c "from repro.hardware import detect_hardware, hardware_tag; print(hardware_tag(detect_hardware()))") && \
	mkdir -p $(RESULTS)/benchmarks/$$tag && \
	echo "== pytest-benchmark ($$tag)" && \
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-sort=name \
		--benchmark-json $(RESULTS)/benchmarks/$$tag/pytest_benchmark.json \
		--benchmark-autosave --benchmark-storage .benchmarks/$$tag $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks *.egg-info
