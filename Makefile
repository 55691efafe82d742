# make run  — install what is needed and run the whole stack on the embedded default
# make test — install what the tests need and run ruff, mypy and pytest
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TOOLS := $(ROOT)/.tools
UV := $(TOOLS)/bin/uv
VENV := $(ROOT)/.venv
export UV_PYTHON := python3
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test deps apt uv sync lint typecheck pytest bench-deps clean

run: deps
	@# Port 69 needs root; a normal user gets 6969 unless configured otherwise.
	@if [ "$$(id -u)" != 0 ] && [ -z "$$NIXBOOT_TFTP__PORT" ]; then export NIXBOOT_TFTP__PORT=6969; fi; \
	  exec $(VENV)/bin/nixboot up

test: deps lint typecheck pytest

deps: apt uv sync

# Every deploy/packages/*.txt lists apt packages (one a line, # comments); install the missing ones.
# Test peers (DHCP servers, tftpd-hpa, Prometheus) must not start as host daemons: while apt runs,
# a policy-rc.d (unless the machine has one) forbids starting services; tests start their own.
apt:
	@pkgs=$$(sed 's/#.*//' $(ROOT)/deploy/packages/*.txt | tr -s ' \n' '\n' | sort -u | grep -v '^$$'); \
	missing=$$(for p in $$pkgs; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing" $$missing; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod 755 /usr/sbin/policy-rc.d; fi; \
	  $(SUDO) apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    -o DPkg::Lock::Timeout=600 $$missing >/dev/null; rc=$$?; \
	  if [ -n "$$guard" ]; then $(SUDO) rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$rc; \
	fi

uv: $(UV)
$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv

sync: $(UV)
	$(UV) sync --frozen --all-packages

lint:
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/pytest

bench-deps: deps
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  -o DPkg::Lock::Timeout=600 nginx-light wrk tftpd-hpa >/dev/null

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
