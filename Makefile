# minillm: `make parity` checks the hand-written model against transformers/peft; `make test` runs the tests.
# Every target installs first (once: a stamp file records it), so a fresh clone needs nothing else.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed compiles its C++ ops on first use; keep them next to the venv so later runs reuse them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install test parity help

help:
	@echo "make parity    - check minillm against transformers/peft, print the table"
	@echo "make test      - install (if needed), check the import contracts, run the test suite (~10 min)"
	@echo "make test-fast - the quick subset for the edit-test loop (no multi-process training runs)"
	@echo "make test-slow - the course path trained as written and resumes on another number of ranks (~15 min)"
	@echo "make install   - create $(VENV) and install everything"
	@echo "make demo      - the course end to end on the bundled data (pretrain both impls, full SFT, chat)"
	@echo "make compare   - --impl minillm vs --impl hf under ZeRO-2: per-step loss table and plot"
	@echo "make bench     - minillm vs transformers/peft/datasets/the course, side by side: table + bench.json"
	@echo "make gpu-check - bf16 parity rows, fused loss at vocab 151,936 and a bf16 train-step benchmark on CUDA"
	@echo "make mutants   - plant realistic one-line bugs one at a time; every one must be caught by a check"
	@echo "make eval MODEL=out/sft - held-out bits per byte and multiple-choice accuracy (lm-eval task files)"
	@echo "make export-check - the GGUF export run by llama.cpp itself (installs llama-cpp-python once: ~25 min)"
	@echo "make doctor RUN=out/sft - is my loss normal? a run's loss against the demo's reference band, likely causes"

install: $(STAMP)

# torch first: where the interpreter already has one (e.g. a GPU machine), the venv sees it and it is
# kept; otherwise a machine without CUDA gets the CPU build (torch==2.13.0) instead of a multi-GB CUDA one.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install torch; \
	else \
	  $(PY) -m pip install "torch==2.13.0"; \
	fi
	$(PY) -m pip install -q -e ".[train,dev]"
	@touch $(STAMP)

# The import contracts first (pyproject.toml: minillm's layers, minillm never imports its references), then the
# tests: about 10 minutes on 2 idle cores, 20 under load. `make test-fast` is the edit-test loop (a few minutes).
test: $(STAMP)
	$(VENV)/bin/lint-imports
	@echo "running the suite: about 15-20 minutes on 2 idle cores (make test-fast: the quick subset; make test-slow: the"
	@echo "course path trained to convergence and resumes on another number of ranks, ~15 more minutes)"
	$(PY) -m pytest -q $(SLOW_SKIP)

# The longest multi-process lanes: the README's course path trained as written (~5-12 min), resuming on another
# number of ranks (~6-9 min), and ranks that die or hang and nodes that never arrive (~4 min, mostly waiting out
# timeouts). `make test-slow` runs them; `make test` leaves them out to stay near 15 min.
SLOW := tests/test_course.py tests/test_resume_world_size.py tests/test_dead_rank.py
SLOW_SKIP := $(foreach t,$(SLOW),--ignore=$(t))
.PHONY: test-slow
test-slow: $(STAMP)
	$(PY) -m pytest -q $(SLOW)

# Everything but the multi-process training runs, the trained-model parity and the mutation checks.
FAST_SKIP := --ignore-glob='tests/test_train*.py' --ignore=tests/test_trained_parity.py --ignore=tests/test_mutants.py \
	--ignore=tests/test_compare.py --ignore=tests/test_bench.py --ignore=tests/test_readme.py \
	--ignore=tests/test_export_llama_cpp.py --ignore=tests/test_multinode.py --ignore=tests/test_resume_world_size.py \
	--ignore=tests/test_dpo_train.py $(SLOW_SKIP)
.PHONY: test-fast
test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(FAST_SKIP)

parity: $(STAMP)
	$(PY) -m parity

# The course end to end on the bundled data (pretrain both impls under ZeRO-2 on 2 ranks, full SFT, chat).
.PHONY: demo compare
demo: $(STAMP)
	$(PY) train/demo.py --out out/demo

# --impl minillm vs --impl hf under ZeRO-2 on 2 ranks: per-step loss table, max |Δ|, plot in out/compare.
compare: $(STAMP)
	$(PY) train/compare.py --out out/compare

# Side-by-side benchmarks (minillm vs transformers/peft/datasets/the course): table + bench.json.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m parity.bench

# The low-precision checks on a GPU (< 8 min); on a machine without CUDA it says so and exits 0.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) -m parity.gpu

# Does the proof catch bugs? Each planted bug in a scratch copy, its checks run; exit 1 if one survives.
.PHONY: mutants
mutants: $(STAMP)
	$(PY) -m parity.mutants

# Held-out bits per byte and the bundled multiple-choice task (lm-eval task YAML), either implementation.
.PHONY: eval
MODEL ?= out/demo/sft-full-minillm
eval: $(STAMP)
	$(PY) train/evaluate.py --model $(MODEL) --tasks minillm/data/eval/sample_mc.yaml minillm/data/eval/heldout.yaml \
	  --output_dir $(or $(OUT),out/eval)

# The exported GGUF run by llama.cpp itself: the `export` extra (llama-cpp-python compiles llama.cpp: ~23 min on 2
# shared cores, once), then the structural checks, tests/test_export_llama_cpp.py (~3 min) and the Modelfile's
# template rendered by Go's text/template as Ollama renders it (Debian's golang-go, installed once if missing).
EXPORT_STAMP := $(VENV)/.installed-export
$(EXPORT_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[export]"
	command -v go >/dev/null || (apt-get update -qq && apt-get install -y -qq golang-go)
	@touch $(EXPORT_STAMP)
.PHONY: export-check
export-check: $(EXPORT_STAMP)
	$(PY) -m pytest -q tests/test_export.py tests/test_export_llama_cpp.py tests/test_export_ollama.py

# Is my loss normal? RUN's trainer_state.json against the demo's reference band (train/reference_curves.json).
.PHONY: doctor
RUN ?= out/demo/sft-full-minillm
doctor: $(STAMP)
	$(PY) train/doctor.py $(RUN)
