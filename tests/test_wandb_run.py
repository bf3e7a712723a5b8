"""One W&B run id per run_dir, from the first start: a job killed before its first checkpoint logs to
the same run when rerun. Real launches, a real kill -9, real offline W&B run folders read back."""
import sys

import pytest

from conftest import launch_cmd, run
from test_faults import fp32_args, kill_group, start, wait_for
from dcgan_dist.report.wandb_file import config as wandb_config

OFFLINE = {"wandb.mode": "offline"}


def run_ids(run_dir) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


def test_a_job_killed_before_its_first_checkpoint_keeps_its_wandb_run(shards32, tmp_path):
    run_dir = tmp_path / "run"
    first = start(fp32_args(shards32, run_dir, steps=100000, **{"train.ckpt_every": 100000, **OFFLINE}), num_processes=1)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2,
                 first, timeout=180, what="the first logged steps")
    finally:
        kill_group(first)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    kept = (run_dir / "wandb-run-id").read_text().strip()
    again = run(launch_cmd(fp32_args(shards32, run_dir, steps=4, **OFFLINE), num_processes=1), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_ids(run_dir) == [kept, kept]                 # two segments, one run
    assert (run_dir / "wandb-run-id").read_text().strip() == kept
    rerun = max((run_dir / "wandb").glob("offline-run-*"))            # the names start with the start time
    (run_file,) = rerun.glob("run-*.wandb")
    assert wandb_config(run_file)["run"]["world_size"] == 1


@pytest.mark.parametrize("content", ["", "../../etc", "x" * 65])
def test_a_bad_run_id_file_is_replaced_with_one_warning(shards32, tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb-run-id").write_text(content)
    out = run([sys.executable, *fp32_args(shards32, run_dir, steps=2, **OFFLINE)[2:]], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [ln for ln in out.stderr.splitlines() if "holds no W&B run id" in ln]
    assert len(warnings) == 1 and str(run_dir / "wandb-run-id") in warnings[0]
    new = (run_dir / "wandb-run-id").read_text().strip()
    assert new.isalnum() and run_ids(run_dir) == [new]


def test_the_server_probe_tells_a_listening_port_from_a_closed_one(monkeypatch):
    import socket

    from dcgan_dist.report.track import server_unreachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert server_unreachable() is None
    assert server_unreachable() == f"127.0.0.1:{port}"               # closed now
    # Behind a proxy, the proxy is what must answer.
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert server_unreachable() == f"127.0.0.1:{port}"


@pytest.mark.parametrize("mode, env, key, expected", [
    ("auto", {"WANDB_MODE": "offline"}, True, ("offline", "")),
    ("auto", {"WANDB_MODE": "disabled"}, True, (None, "")),
    ("auto", {}, False, ("offline", "no API key: set WANDB_API_KEY or run `wandb login` to log online")),
    ("online", {}, False, ("offline", "")),                       # a warning instead: asked for online
    ("offline", {}, True, ("offline", ""))])
def test_the_mode_follows_the_key_the_variable_and_the_server(monkeypatch, tmp_path, mode, env, key, expected):
    from dcgan_dist.config import load_config
    from dcgan_dist.report.track import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                      # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode(load_config(None, [f"wandb.mode={mode}"])) == expected


def test_the_samples_table_is_skipped_quietly_without_attributes_and_explained_without_a_classifier(
        tmp_path, shards32, capsys):
    import shutil

    from PIL import Image

    from dcgan_dist.eval.attributes import scorer_for
    from dcgan_dist.data.celeba import open_source
    from dcgan_dist.data.shards import ShardSet, Sharding, write_shards

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"{i}.png")
    write_shards(open_source(folder, "all"), tmp_path / "plain",
                 Sharding(resolution=32, split="all", shard_size=4, workers=1, progress=False))
    assert scorer_for(ShardSet.open(tmp_path / "plain")) is None
    assert capsys.readouterr().err == ""
    labelled = tmp_path / "labelled"
    shutil.copytree(shards32, labelled, ignore=shutil.ignore_patterns("attributes.safetensors"))
    assert scorer_for(ShardSet.open(labelled)) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"launch/attributes.py --shards {labelled}" in err
