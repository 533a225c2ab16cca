# Two set-up commands: `make demo` and `make test`. Both build .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch first: on a machine without an NVIDIA GPU prefer the small CPU wheel (torch 2.13.0 sits
# in pip's local find-links here); a GPU user gets the normal CUDA build from requirements.txt.
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VPY) -m pip install -q torch; \
	else \
	  $(VPY) -m pip install -q torch==2.13.0 || $(VPY) -m pip install -q torch; \
	fi
	$(VPY) -m pip install -q -r requirements.txt
	touch $(STAMP)

test: install
	$(VPY) -m pytest -q tests

demo: install
	$(VPY) tests/demo.py

bench: install
	$(VPY) tests/bench.py

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache
