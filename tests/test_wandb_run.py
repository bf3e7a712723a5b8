"""One W&B run id per run_dir, from the first start: a job killed before its first checkpoint logs to
the same run when rerun. Real launches, a real kill -9, real offline W&B run folders read back."""
import pytest

from conftest import launch_cmd, run
from test_faults import fp32_args, kill_group, start, wait_for
from wandb_file import config as wandb_config


def run_ids(run_dir) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


def test_a_job_killed_before_its_first_checkpoint_keeps_its_wandb_run(shards32, tmp_path):
    run_dir = tmp_path / "run"
    first = start(fp32_args(shards32, run_dir, steps=100000, **{"train.ckpt_every": 100000}), num_processes=1)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2,
                 first, timeout=180, what="the first logged steps")
    finally:
        kill_group(first)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    kept = (run_dir / "wandb-run-id").read_text().strip()
    again = run(launch_cmd(fp32_args(shards32, run_dir, steps=4), num_processes=1), timeout=300)
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
    out = run(launch_cmd(fp32_args(shards32, run_dir, steps=2), num_processes=1), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [ln for ln in out.stderr.splitlines() if "holds no W&B run id" in ln]
    assert len(warnings) == 1 and str(run_dir / "wandb-run-id") in warnings[0]
    new = (run_dir / "wandb-run-id").read_text().strip()
    assert new.isalnum() and run_ids(run_dir) == [new]
