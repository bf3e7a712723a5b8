"""Shared fixtures: a small synthetic CelebA (real JPEGs, real metadata files) and real tar shards."""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcgan_dist.data.celeba import open_source
from dcgan_dist.data.shards import Sharding, write_shards
from dcgan_dist.data.synthetic import write_celeba

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ALL_CORES = sorted(os.sched_getaffinity(0))        # before pytest_configure gives this worker its share


def xdist_worker() -> int | None:
    """This pytest-xdist worker's index (gw0 -> 0), or None outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") else None


def pytest_configure(config):
    """Each pytest-xdist worker gets its own share of the cores, and every job it starts inherits it, so
    the product's own default (cores / ranks) gives each rank the threads it can really run. Unpinned,
    two workers' jobs each start 2 threads on 2 cores, and OpenMP's threads then wait on one another:
    two 300-step trainings side by side took 8 min 40 s each, against 35 s pinned."""
    import torch

    worker, count = xdist_worker(), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is not None and 1 < count <= len(ALL_CORES):
        mine = ALL_CORES[worker % count::count]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))


def on_all_cores() -> None:
    """preexec_fn for a job that must see every core, whatever this worker's share."""
    os.sched_setaffinity(0, ALL_CORES)


# Seconds of worker time per module, as the last `DCGAN_RECORD_DURATIONS=1 make test` measured them.
DURATIONS = Path(__file__).with_name("module_seconds.json")


def heaviest_modules_first(items) -> None:
    """`make test` hands each module to one worker whole (`--dist loadscope`, `--no-loadscope-reorder`),
    one at a time as a worker runs low. Handing out the heaviest first lets the two workers finish
    together (docs/PERFORMANCE.md, "The test suite"). Tests keep their order within a module; modules
    never measured go last, as if they took no time."""
    try:
        seconds = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        seconds = {}
    items.sort(key=lambda item: -seconds.get(item.module.__name__, 0))


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """On the controller too, under xdist: every worker's reports arrive there."""
    if os.environ.get("DCGAN_RECORD_DURATIONS") and xdist_worker() is None:
        module = Path(report.nodeid.split("::")[0]).stem
        _measured[module] = _measured.get(module, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if _measured and exitstatus == 0:
        merged = {**(json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}),
                  **{m: round(s) for m, s in _measured.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(merged.items(), key=lambda kv: -kv[1])), indent=1) + "\n")


# What an end-to-end test does, in its own body, in a test helper it calls or in a fixture it uses:
# start processes.
E2E_CALLS = re.compile(r"\b(launch_cmd|accelerate_launch|train_once|subprocess\.\w+|Popen)\(|"
                       r"\brun\(\[(sys\.executable|BIN|str\(BIN)")
CALLED = re.compile(r"\b([A-Za-z_]\w*)\(")


def _starts_processes(func, fixtures, seen) -> bool:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if E2E_CALLS.search(source):
        return True
    helpers = [func.__globals__.get(name) for name in CALLED.findall(source)]
    fixture_funcs = [d.func for name in inspect.signature(func).parameters for d in fixtures.get(name, ())]
    for other in helpers + fixture_funcs:
        if inspect.isfunction(other) and other not in seen and str(ROOT / "tests") in (inspect.getsourcefile(other) or ""):
            seen.add(other)
            if _starts_processes(other, fixtures, seen):
                return True
    return False


def mark_end_to_end(items) -> None:
    """`e2e` on every test that starts processes (a launch, a script, docker, sbatch), found from its
    source and its fixtures'; `make test-fast` runs the rest."""
    for item in items:
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if _starts_processes(item.function, fixtures, set()):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_modifyitems(config, items):
    import torch

    mark_end_to_end(items)
    heaviest_modules_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; benchmarks/gpu_check.sh runs these on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def celeba_parent(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("synthetic")
    write_celeba(parent, num=240, seed=0, progress=False)
    return parent


@pytest.fixture(scope="session")
def shards32(celeba_parent, tmp_path_factory) -> Path:
    """The train split (~193 images) at 32 px in uneven shards of 50: 50, 50, 50, 43, in blocks of 16."""
    out = tmp_path_factory.mktemp("shards32")
    write_shards(open_source(celeba_parent, "train"), out,
                 Sharding(resolution=32, split="train", shard_size=50, workers=2, progress=False, images_per_block=16))
    return out


def once(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session by whichever pytest-xdist worker asks first; the others wait
    for it. For what several modules read and none changes: one trained generator, not one per module."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    root = root.parent if xdist_worker() is not None else root
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".made").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            make(out)
            (out / ".made").touch()
    return out


@pytest.fixture(scope="session")
def faces32(tmp_path_factory) -> Path:
    """1,200 synthetic faces at 32 px with their attributes: enough for the attribute classifier to show
    what it learned, and for a generator to beat an untrained one by every metric."""
    def make(out: Path) -> None:
        write_celeba(out / "source", num=1200, seed=5, progress=False)
        write_shards(open_source(out / "source", "all"), out / "shards",
                     Sharding(resolution=32, split="all", shard_size=400, workers=2, progress=False, images_per_block=64))

    return once(tmp_path_factory, "faces32", make) / "shards"


@pytest.fixture(scope="session")
def trained32(faces32, tmp_path_factory) -> Path:
    """A generator trained on faces32 for 300 steps (19.2 kimg), with checkpoints at 150 and 300, a best
    checkpoint by SWD and an offline W&B run: what test_generate and test_evaluate use."""
    keys = {"model.ngf": 32, "model.ndf": 32, "data.batch_size": 64, "train.steps": 300, "train.log_every": 50,
            "train.sample_every": 300, "train.ckpt_every": 150, "train.num_samples": 64, "eval.num_images": 64,
            "eval.every_kimg": 9.6, "wandb.mode": "offline"}
    return once(tmp_path_factory, "trained32", lambda out: train_small(faces32, out, **keys))


@pytest.fixture(scope="session")
def straight(shards32, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank fp32 run of 24 steps (test_faults' arguments): the trace that every kill,
    resume and remote read must give."""
    from test_faults import finish, fp32_args

    return once(tmp_path_factory, "straight", lambda run_dir: finish(fp32_args(shards32, run_dir)))


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`env`, when given, is the whole environment (so a test can take variables away)."""
    full_env = {"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(os.environ if env is None else env)}
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env, **kw)


def launch_cmd(args: list, num_processes: int = 2) -> list[str]:
    """The real launcher, as a user types it (torchrun underneath, gloo on CPU). Under pytest-xdist each
    worker gets its own rendezvous port: two launches both finding 29500 free and both binding it is a
    race that Accelerate's busy-port fallback does not cover. 29500 itself is left to the launches that
    take the default (the benchmark scripts run by slow tests)."""
    worker = xdist_worker()
    port = [] if worker is None else ["--main_process_port", str(29600 + 100 * worker)]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
            "--num_processes", str(num_processes), *port, *map(str, args)]


def accelerate_launch(args: list, num_processes: int = 2, **kw) -> subprocess.CompletedProcess:
    return run(launch_cmd(args, num_processes), **kw)


def overrides(keys: dict) -> list[str]:
    """Config overrides as `key=value`, each value written as the YAML it is parsed as: str(None) would
    be the string 'None', not null."""
    def text(value):
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return [f"{k}={text(v)}" for k, v in keys.items()]


def train_small(shards: Path, run_dir: Path, **keys) -> Path:
    """A 32 px generator trained in one plain process, for tests that need a trained model rather than
    ranks; `keys` (dotted, as on the command line) override configs/demo.yaml's."""
    keys = {"data.shards": shards, "run_dir": run_dir, "model.resolution": 32, "data.shuffle_buffer": 256,
            "eval.metrics": "swd", **keys}
    out = run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml", *overrides(keys)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def saved_net(checkpoint: Path, net: str) -> dict:
    """The state dict of "G", "D" or "ema" in a checkpoint folder, read (and checked) as a resume reads it."""
    return {k[len(net) + 1:]: v for k, v in checkpoint_nets(Path(checkpoint)).items() if k.startswith(net + ".")}


def checkpoint_nets(checkpoint: Path) -> dict:
    """nets.safetensors of a checkpoint folder, read only once its size and sha256 match COMPLETE."""
    from safetensors.torch import load

    from dcgan_dist.run.checkpoint import NETS, read_file, read_marker

    return load(read_file(checkpoint, read_marker(checkpoint), NETS))


def read_metrics(run_dir: Path) -> list[dict]:
    """run_dir/metrics.jsonl as a list of rows."""
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
