# voicechat: LFM2-Audio voice chat over gRPC.
#   make run     set up and serve the real model locally, with the browser page (needs the weights: make download)
#   make demo    serve the deterministic backend, hold one turn with the file client, show the browser page
#   make talk    talk to a running server with the microphone client
#   make realtime  serve /v1/realtime and the browser page in front of a running server (ARGS="--target ...")
#   make test    set up everything and run the test suite
#   make check   lint (ruff, mypy, buf) and stub drift
#   make bench   quick latency benchmark, tuned pipeline vs the old baseline
#   make docs    regenerate the docs' generated tables (configuration, benchmark results)
#   make lock    re-resolve requirements.lock (ARGS="-P name" upgrades one package)
#   make check-upgrades  run the model tests on the newest releases the constraints allow

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# the lock's uv pin (tests/test_lock.py keeps them equal)
UV_VERSION := 0.13.9
PORT ?= 50051
# the OpenAI-Realtime-compatible WebSocket bridge and browser page (docs/realtime.md) of `make run` / `make demo`
REALTIME_PORT ?= 8000
ARGS ?=
STAMP := $(VENV)/.installed
PROTO := proto/voicechat/v1/voicechat.proto
STUBS := voicechat/v1/voicechat_pb2.py voicechat/v1/voicechat_pb2_grpc.py voicechat/v1/voicechat_pb2.pyi

.PHONY: help venv system-deps node-deps proto run serve-scripted demo talk realtime download test check bench \
        deploy deploy-realtime modal-download modal-url tiny-model clean lock check-upgrades docs

help:
	@sed -n 's/^#   //p' Makefile

# -- set-up -----------------------------------------------------------------------
# The venv holds exactly requirements.lock (`uv pip sync` removes anything else) plus this project, editable.
$(STAMP): requirements.lock pyproject.toml
	@PY312=$$(scripts/find_python.sh) || exit 1; \
	  [ -x $(PY) ] || { echo "creating $(VENV) with $$PY312"; $$PY312 -m venv $(VENV); }
	$(PY) -m pip install -q uv==$(UV_VERSION)
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip sync -q --require-hashes requirements.lock
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip install -q --no-deps -e .
	@touch $@

venv: $(STAMP)

# Re-resolve requirements.lock from pyproject.toml, keeping today's pins where allowed; ARGS="-P name" upgrades
# one package, ARGS=--upgrade all of them. Commit the lock with the change that needed it.
lock: $(STAMP)
	UV=$(VENV)/bin/uv scripts/lock.sh $(ARGS)

# Drift check: a throwaway venv with the newest releases pyproject.toml allows, running the model tests there.
check-upgrades: $(STAMP)
	UV=$(VENV)/bin/uv scripts/check_upgrades.sh $(ARGS)

system-deps:
	@scripts/system_deps.sh

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	@touch $@

node-deps: node_modules/.bin/buf

# The stubs are committed; `make proto` regenerates them and `make check` fails
# when they drift from the .proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO)

# -- serving ------------------------------------------------------------------------
run: $(STAMP)
	@echo "browser page and /v1/realtime: http://127.0.0.1:$(REALTIME_PORT)/ (once the model is loaded)"
	$(PY) -m service --backend lfm2 --port $(PORT) --realtime-port $(REALTIME_PORT) $(ARGS)

download: $(STAMP)
	$(PY) scripts/download_model.py $(ARGS)

serve-scripted: $(STAMP)
	$(PY) -m service --backend scripted --scripted-step-ms 15 --port $(PORT) $(ARGS)

demo: $(STAMP)
	@set -e; log=$$(mktemp); \
	$(PY) -m service --backend scripted --scripted-step-ms 15 --port 0 --realtime-port $(REALTIME_PORT) > $$log 2>&1 & pid=$$!; \
	trap "kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; rm -f $$log" EXIT; \
	for i in $$(seq 100); do grep -q "serving on" $$log && break; sleep 0.1; done; \
	port=$$(sed -n 's/.*serving on .*:\([0-9]*\)$$/\1/p' $$log); \
	echo "scripted server on port $$port"; \
	$(PY) -m clients.file --target 127.0.0.1:$$port --text "Hello from the demo" --out demo-reply.wav --show-metrics; \
	echo "reply audio saved to demo-reply.wav"; \
	sed -n 's/^realtime bridge on //p' $$log | sed 's/^/browser page and \/v1\/realtime: /'; \
	if [ -t 0 ]; then read -r -p "open the page to talk to the scripted model; press Enter to stop " _; fi

talk: $(STAMP)
	$(PY) -m clients.mic --target 127.0.0.1:$(PORT) $(ARGS)

realtime: $(STAMP)
	$(PY) -m realtime --target 127.0.0.1:$(PORT) --port $(REALTIME_PORT) $(ARGS)

tiny-model: $(STAMP)
	$(PY) scripts/make_tiny_model.py models/tiny

# -- quality ------------------------------------------------------------------------
test: system-deps node-deps $(STAMP)
	env -u MODAL_TOKEN_ID -u MODAL_TOKEN_SECRET $(PY) -m pytest -q $(ARGS)

check: node-deps $(STAMP)
	$(VENV)/bin/ruff check service clients tests bench deploy scripts realtime
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint proto
	@tmp=$$(mktemp -d); \
	  $(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTO); \
	  for f in $(STUBS); do cmp -s $$f $$tmp/$$f || { echo "stub drift: $$f differs from 'make proto' output"; rm -rf $$tmp; exit 1; }; done; \
	  rm -rf $$tmp; echo "stubs match $(PROTO)"

bench: system-deps $(STAMP)
	$(PY) -m bench.latency --quick $(ARGS)

# The tables in docs/ that come from code and data; tests/test_docs.py fails when they are stale.
docs: $(STAMP)
	$(PY) -m scripts.config_table --write
	$(PY) -m scripts.bench_tables --write

# -- Modal deployment -----------------------------------------------------------------
deploy: $(STAMP)
	$(VENV)/bin/modal deploy deploy/modal_app.py

# the realtime bridge's CPU web function (docs/realtime.md), dialing the deployed GPU Server
deploy-realtime: $(STAMP)
	$(VENV)/bin/modal deploy deploy/modal_app.py::realtime_app

modal-download: $(STAMP)
	$(VENV)/bin/modal run deploy/modal_app.py --action download

modal-url: $(STAMP)
	$(VENV)/bin/modal run deploy/modal_app.py --action url

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
