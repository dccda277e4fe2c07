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

.PHONY: deploy test venv lint unit syntax molecule host-deps clean

$(BIN)/.installed: requirements-dev.txt requirements.yml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --requirement requirements-dev.txt
	# A no-op when the collections bundled with `ansible` satisfy requirements.yml (Galaxy may be unreachable).
	$(BIN)/ansible-galaxy collection install -r requirements.yml
	touch $@

venv: $(BIN)/.installed

deploy: venv
	$(BIN)/ansible-playbook site.yml -i $(INVENTORY)

test: lint unit syntax molecule

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

host-deps:
	bash tests/host-deps.sh

# Starts Docker if it is not running (and stops it again), builds the test image, runs Molecule.
molecule: venv host-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/molecule.sh $(SCENARIO)

clean:
	rm -rf $(VENV) .cache
