# privimage: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Exact pins for this project's CPU machines; pyproject.toml holds the ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Per-stage targets share one run directory so each picks up the previous stage's files.
RUN ?= runs/make
# `make demo` keeps one run folder, so running it again reuses the finished stages.
DEMO_RUN ?= runs/demo/main
EXPERIMENT ?= demo
ARGS ?=
# `make sweep` runs EXPERIMENT at every epsilon of conf/sweep/epsilon.yaml (or EPSILONS=1,4).
EPSILONS ?=
# `make report` gathers every finished run under RUNS into REPORT_OUT.
RUNS ?= runs
REPORT_OUT ?= results

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format query pretrain finetune sample evaluate audit all sweep report bench clean

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: RUN=$(RUN) DEMO_RUN=$(DEMO_RUN) EXPERIMENT=$(EXPERIMENT) EPSILONS=$(EPSILONS) ARGS='hydra overrides' RUNS=$(RUNS) REPORT_OUT=$(REPORT_OUT)"

$(BIN)/privimage: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	@touch $@

install: $(BIN)/privimage ## create .venv and install privimage with its dev extra

demo: $(BIN)/privimage ## run the whole pipeline on the embedded default (MNIST digits + font glyphs)
	$(BIN)/privimage experiment=demo hydra.run.dir=$(DEMO_RUN) $(ARGS)

test: $(BIN)/privimage ## run the test suite
	$(BIN)/pytest -q $(ARGS)

test-fast: $(BIN)/privimage ## run the tests without the slow ones
	$(BIN)/pytest -q -m "not slow" $(ARGS)

lint: $(BIN)/privimage ## ruff lint and format check
	$(BIN)/ruff check privimage tests bench notebooks
	$(BIN)/ruff format --check privimage tests bench notebooks

format: $(BIN)/privimage ## ruff format and autofix
	$(BIN)/ruff format privimage tests bench
	$(BIN)/ruff check --fix privimage tests bench

query: $(BIN)/privimage ## stage: DP semantic query: pick public classes per sensitive class (in RUN)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[query] hydra.run.dir=$(RUN) $(ARGS)

pretrain: $(BIN)/privimage ## stage: pretrain the UNet on the selected public images (in RUN)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[pretrain] hydra.run.dir=$(RUN) $(ARGS)

finetune: $(BIN)/privimage ## stage: DP-SGD fine-tune on the sensitive data (in RUN)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[finetune] hydra.run.dir=$(RUN) $(ARGS)

sample: $(BIN)/privimage ## stage: sample the synthetic dataset (in RUN)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[sample] hydra.run.dir=$(RUN) $(ARGS)

evaluate: $(BIN)/privimage ## stage: fidelity, utility and leakage of the samples (in RUN; or ARGS=evaluate.synthetic=DIR)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[evaluate] hydra.run.dir=$(RUN) $(ARGS)

audit: $(BIN)/privimage ## stage: one-run privacy audit, a measured lower bound on epsilon (in RUN, after pretrain; private)
	$(BIN)/privimage experiment=$(EXPERIMENT) stages=[audit] hydra.run.dir=$(RUN) $(ARGS)

all: $(BIN)/privimage ## run every stage in RUN (finished stages are skipped)
	$(BIN)/privimage experiment=$(EXPERIMENT) hydra.run.dir=$(RUN) $(ARGS)

sweep: $(BIN)/privimage ## EXPERIMENT at epsilon 1, 5, 10 (Hydra multirun; query and pretraining computed once)
	$(BIN)/privimage experiment=$(EXPERIMENT) sweep=epsilon $(if $(EPSILONS),privacy.epsilon=$(EPSILONS)) $(ARGS)

report: $(BIN)/privimage ## one results table (md, csv) and FID/accuracy-vs-epsilon plots of the runs under RUNS
	$(BIN)/privimage report $(RUNS) --out $(REPORT_OUT)

bench: $(BIN)/privimage ## PrivImage vs PDP-Diffusion vs DPDM on CIFAR-10 at epsilon 10 and 1 (~80 min on 2 CPU cores, +20 min the first time for the query classifier) -> docs/results.md
	$(BIN)/python bench/paper_claim.py $(ARGS)

clean: ## remove runs/ (keeps .venv and the data cache)
	rm -rf runs
