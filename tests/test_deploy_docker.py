"""docker/Dockerfile built and run for real, on a local CPU base image (tests/deploy/setup_host.sh makes
one: Debian, Python 3.11, a CPU torch wheel). Skipped, with one line, where no Docker engine answers.

The image is used as users use it: uid 1000, /data and /runs mounted, its own entry point."""
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.deploy
BASE_IMAGE_FILE = Path("/var/lib/dcgan-dist-deploy/base-image")
TINY = ["model.resolution=32", "model.ngf=8", "model.ndf=8", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=32", "train.log_every=2", "train.sample_every=1000", "train.num_samples=4",
        "wandb.mode=offline", "eval.metrics="]


def docker(*args, timeout=120, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"docker {' '.join(map(str, args[:3]))}: {out.stderr[-3000:]}"
    return out


def base_image() -> str | None:
    name = os.environ.get("DCGAN_TEST_BASE_IMAGE") or (BASE_IMAGE_FILE.read_text().strip()
                                                      if BASE_IMAGE_FILE.is_file() else "")
    return name or None


@pytest.fixture(scope="module")
def image():
    if shutil.which("docker") is None or docker("info", timeout=20, check=False).returncode != 0:
        pytest.skip("no Docker engine answers `docker info` (tests/deploy/setup_host.sh starts one)")
    base = base_image()
    if base is None or docker("image", "inspect", base, check=False).returncode != 0:
        pytest.skip("no local base image (tests/deploy/setup_host.sh builds one; or set DCGAN_TEST_BASE_IMAGE)")
    tag = f"dcgan-dist:test-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    built = subprocess.run(["docker", "build", "--network", "host", "-f", "docker/Dockerfile",
                            "--build-arg", f"BASE_IMAGE={base}", "-t", tag, "."],
                           cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"\ndocker: built {tag} on {base} in {time.time() - t0:.0f} s")
    yield tag
    docker("image", "rm", "-f", tag, check=False)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """/data and /runs on the host, owned by the image's user as a real deployment's volumes would be."""
    root = tmp_path_factory.mktemp("docker")
    for name in ("data", "runs"):
        (root / name).mkdir()
        os.chown(root / name, 1000, 1000)
    return root


def run_args(volumes: Path, name: str | None = None, detach=False) -> list[str]:
    return ["run", *(["-d"] if detach else ["--rm"]), *(["--name", name] if name else []), "--network", "host",
            "--user", "1000:1000", "-e", "MIXED_PRECISION=no", "-e", "WANDB_SILENT=true",
            "-v", f"{volumes / 'data'}:/data", "-v", f"{volumes / 'runs'}:/runs"]


@pytest.fixture(scope="module")
def shards(image, volumes):
    made = docker(*run_args(volumes), image, "make-synthetic", "--output", "/data/synthetic", "--num", "300",
                  "--seed", "0", timeout=300)
    assert "wrote 300 images in CelebA layout" in made.stdout
    cut = docker(*run_args(volumes), image, "shard", "--input", "/data/synthetic", "--output", "/data/shards32",
                 "--resolution", "32", "--split", "train", "--shard-size", "100", "--workers", "1", timeout=300)
    assert "in 3 shards to /data/shards32" in cut.stdout, cut.stdout + cut.stderr
    assert os.stat(volumes / "data/shards32/manifest.json").st_uid == 1000
    return "/data/shards32"


def test_image_holds_only_what_it_runs_and_is_not_root(image):
    def sh(command: str) -> str:
        return docker("run", "--rm", "--entrypoint", "bash", image, "-c", command).stdout.split()

    assert sorted(sh("ls -A /opt/dcgan-dist/docker")) == ["Dockerfile", "entrypoint.sh", "requirements.txt"]
    top = sh("ls -A /opt/dcgan-dist")
    assert not {"tests", ".git", "data", "runs", ".venv"} & set(top), top
    assert sh("id -u") == ["1000"]


def wait_training(run_dir: Path, container: str, timeout: float = 240) -> None:
    """Until the container's job has logged a few steps to run_dir/metrics.jsonl."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert time.time() < deadline, docker("logs", container, check=False).stderr[-3000:]
        time.sleep(0.5)


def train_args(shards: str, run_dir: str, steps: int) -> list[str]:
    return ["--config", "configs/demo.yaml", f"data.shards={shards}", f"run_dir={run_dir}",
            f"train.steps={steps}", "train.ckpt_every=100000", *TINY]


def stop_mid_run(image: str, volumes: Path, shards: str, run_dir: str, env: list[str] = ()) -> tuple[str, str, float]:
    """Start a long job in a container, `docker stop` it once it trains: (exit code, logs, stop seconds)."""
    name = f"dcgan-test-{uuid.uuid4().hex[:8]}"
    docker(*run_args(volumes, name, detach=True), *env, image, *train_args(shards, run_dir, 100000))
    try:
        wait_training(volumes / run_dir.removeprefix("/"), name)
        t0 = time.time()
        docker("stop", "-t", "120", name, timeout=180)
        stop_s = time.time() - t0
        code = docker("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        shown = docker("logs", name)
    finally:
        docker("rm", "-f", name, check=False)
    return code, shown.stdout + shown.stderr, stop_s


def test_two_cpu_ranks_train_stop_exit_0_and_resume_then_generate(image, volumes, shards):
    code, logs, stop_s = stop_mid_run(image, volumes, shards, "/runs/r")
    run_dir = volumes / "runs/r"
    print(f"\ndocker: `docker stop` to exit in {stop_s:.1f} s")
    assert code == "0", logs[-3000:]
    assert "dcgan-dist: world_size=2 " in logs and "stopped by SIGTERM, exit 0" in logs
    assert "SignalException" not in logs and "Traceback" not in logs, logs[-3000:]
    (saved,) = [p for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]
    assert os.stat(saved).st_uid == 1000
    step = int(saved.name.split("-")[1])

    again = docker(*run_args(volumes), image, *train_args(shards, "/runs/r", step + 4), timeout=300)
    assert f"resuming from /runs/r/checkpoints/{saved.name}" in again.stdout, again.stderr[-3000:]
    assert (run_dir / f"checkpoints/step-{step + 4:08d}/COMPLETE").is_file()

    grid = docker(*run_args(volumes), image, "generate", "--checkpoint", "/runs/r", "--num", "16",
                  "--output", "/runs/r/grid.png", timeout=300)
    assert f"from /runs/r/checkpoints/step-{step + 4:08d}/generator.safetensors" in grid.stderr, grid.stderr
    assert (run_dir / "grid.png").stat().st_size > 1000


def test_preempted_exit_code_is_what_kubernetes_retries(image, volumes, shards):
    """PREEMPTED_EXIT_CODE=143 as the manifests in docker/k8s/ set it: a stop by signal exits 143
    (retryable to restartPolicy: ExitCode); a bad input still exits 1 (permanent)."""
    code, logs, _ = stop_mid_run(image, volumes, shards, "/runs/k8s", env=["-e", "PREEMPTED_EXIT_CODE=143"])
    assert code == "143", logs[-3000:]
    bad = docker(*run_args(volumes), "-e", "PREEMPTED_EXIT_CODE=143", image, "--config", "configs/demo.yaml",
                 "data.shards=/data/nothing-here", "run_dir=/runs/bad", *TINY, check=False, timeout=300)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")][0].count("/data/nothing-here") == 1
