"""The W&B dashboard from a real 2-rank offline run, killed with kill -9 and resumed: the run files
read back record by record. kimg on every chart's x-axis, the config keys and WANDB_* variables, the
generator as a model artifact, the samples table, and the plan that uploads both segments as one run
(executed against a recording stand-in for the `wandb` CLI: no server is reachable from the tests)."""
import base64
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launch_cmd, read_metrics, run
from dcgan_dist.data.shards import ShardSet
from dcgan_dist.report.wandb_file import config as wandb_config
from dcgan_dist.report.wandb_file import history, kind, read_records
from test_faults import fp32_args, kill_group, last_step, start, wait_for

CKPT_EVERY, NUM_SAMPLES = 30, 4
KEY = "dummy-key-0123456789abcdef0123456789abcdef"
# A key, so that wandb.mode=auto tries online, and a server that does not answer, so that it goes offline.
ENV = {"WANDB_API_KEY": KEY, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_PROJECT": "envproj",
       "WANDB_NAME": "envname", "WANDB_RUN_GROUP": "envgroup", "WANDB_JOB_TYPE": "envjob"}


def job_args(shards, run_dir, steps):
    return fp32_args(shards, run_dir, steps=steps, **{
        "train.ckpt_every": CKPT_EVERY, "train.num_samples": NUM_SAMPLES, "wandb.mode": "auto", "wandb.project": None,
        "wandb.group": "cfggroup", "wandb.tags": "baseline, cpu", "wandb.notes": "a note",
        "eval.metrics": "swd", "eval.num_images": 64, "eval.every_kimg": 0.064})       # every 4 steps


def logged_steps(run_dir) -> list[int]:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return [row["_step"] for row in history(files[0])] if files else []


@pytest.fixture(scope="module")
def dashboard(shards32, tmp_path_factory):
    """Two segments of one run: the first killed past a checkpoint, the second resumed to the end."""
    root = tmp_path_factory.mktemp("dashboard")
    shards = root / "shards"
    shutil.copytree(shards32, shards)
    made = run([sys.executable, "launch/attributes.py", "--shards", shards, "--epochs", "1"], timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    run_dir = root / "run"
    first = start(job_args(shards, run_dir, steps=100000), env=ENV)
    try:
        # Until the run file itself holds rows past the checkpoint: wandb writes it every 2 s, well
        # before the next checkpoint.
        wait_for(lambda: max(logged_steps(run_dir), default=0) > CKPT_EVERY + 1, first, timeout=240,
                 what="W&B rows past a checkpoint")
    finally:
        kill_group(first)
    killed_at = last_step(run_dir)
    steps = killed_at + 8                  # the second start replays the steps after its checkpoint, and more
    out = run(launch_cmd(job_args(shards, run_dir, steps=steps)), timeout=400, env={**os.environ, **ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    files = [next(s.glob("run-*.wandb")) for s in segments]
    return {"run_dir": run_dir, "shards": shards, "stderr": out.stderr, "killed_at": killed_at, "steps": steps,
            "segments": segments, "files": files, "records": [read_records(f) for f in files]}


def of_kind(records, name):
    return [getattr(r, name) for r in records if kind(r) == name]


def test_auto_mode_goes_offline_in_one_line_and_names_the_folder(dashboard):
    lines = [ln for ln in dashboard["stderr"].splitlines() if "W&B" in ln and "warning" not in ln]
    assert len(lines) == 1, lines
    assert "offline (the W&B server 127.0.0.1:9 does not answer)" in lines[0]
    assert str(dashboard["segments"][1]) in lines[0] and "launch/wandb_sync.py" in lines[0]


def test_config_keys_beat_the_environment_and_null_keys_leave_it_in_charge(dashboard):
    (rec,) = of_kind(dashboard["records"][1], "run")
    assert rec.run_group == "cfggroup" and list(rec.tags) == ["baseline", "cpu"] and rec.notes == "a note"
    assert rec.project == "envproj" and rec.display_name == "envname" and rec.job_type == "envjob"
    assert rec.run_id == (dashboard["run_dir"] / "wandb-run-id").read_text().strip()


def test_no_file_of_the_run_holds_the_api_key(dashboard):
    leaks = [p for p in dashboard["run_dir"].rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaks


def test_every_chart_is_plotted_against_kimg(dashboard):
    records = dashboard["records"][1]
    metrics = {m.name or m.glob_name: m for m in of_kind(records, "metric")}
    for section in ("train", "eval", "samples"):
        assert metrics[f"{section}/*"].step_metric == "train/kimg"
    assert metrics["eval/swd"].summary.min and metrics["eval/fid"].summary.min
    rows = history(dashboard["files"][1])
    charted = [r for r in rows if any(k.split("/")[0] in ("train", "eval", "samples") for k in r)]
    assert charted and all("train/kimg" in r for r in charted)
    by_step = {m["step"]: m["kimg"] for m in read_metrics(dashboard["run_dir"]) if "loss_d" in m}
    assert all(r["train/kimg"] == pytest.approx(by_step[r["_step"]]) for r in rows if r["_step"] in by_step)
    assert any("eval/swd" in r for r in rows)


def model_artifacts(records):
    return [a for a in of_kind(records, "artifact") if a.type == "model"]


def test_the_generator_is_a_model_artifact_with_best_and_latest(dashboard, tmp_path):
    STEPS = dashboard["steps"]
    arts = model_artifacts(dashboard["records"][1])
    assert arts and all(a.name == f"generator-{a.run_id}" for a in arts)
    final = arts[-1]
    assert "latest" in final.aliases and f"step-{STEPS}" in final.aliases
    # The best may have come in the first segment; the newest "best" is the checkpoint's best.
    best = [a for recs in dashboard["records"] for a in model_artifacts(recs) if "best" in a.aliases]
    state = json.loads((dashboard["run_dir"] / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert best and json.loads(best[-1].metadata)["step"] == state["best"]["step"]
    meta = json.loads(final.metadata)
    assert meta["step"] == STEPS and meta["kimg"] == pytest.approx(STEPS * 16 / 1000)
    assert "swd" in meta["metrics"] and meta["model"] == {"resolution": 32, "nz": 100, "ngf": 8, "ndf": 8}
    assert meta["shards_manifest_digest"] == ShardSet.open(dashboard["shards"]).digest
    # The staged file is the step's snapshot, byte for byte, and a folder holding it (as a download of
    # wandb:ENTITY/PROJECT/NAME:latest would) is what generate.py samples from.
    (entry,) = final.manifest.contents
    staged = Path(entry.local_path)
    assert staged.is_relative_to(dashboard["run_dir"] / "wandb" / "data")
    assert base64.b64encode(hashlib.md5(staged.read_bytes()).digest()).decode() == entry.digest
    snapshot = dashboard["run_dir"] / "checkpoints" / f"step-{STEPS:08d}" / entry.path
    assert staged.read_bytes() == snapshot.read_bytes()
    download = tmp_path / f"{final.name}:latest"
    download.mkdir()
    shutil.copy(staged, download / entry.path)
    out = run([sys.executable, "launch/generate.py", "--checkpoint", download, "--num", 4,
               "--output", tmp_path / "grid.png", "--device", "cpu"], timeout=200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"(step {STEPS}, cpu)" in out.stderr and (tmp_path / "grid.png").is_file()


def test_each_evaluation_logs_a_samples_table_with_attribute_scores(dashboard):
    rows = [r for r in history(dashboard["files"][1]) if "samples/table/path" in r]
    evals = [r for r in history(dashboard["files"][1]) if "eval/swd" in r]
    assert rows and len(rows) == len(evals)
    table = json.loads((dashboard["segments"][1] / "files" / rows[-1]["samples/table/path"]).read_text())
    columns = table["columns"]
    assert columns[:5] == ["image", "index", "step", "kimg", "top"] and "Smiling" in columns and "Eyeglasses" in columns
    assert len(table["data"]) == NUM_SAMPLES
    probs = [p for row in table["data"] for p in row[5:]]
    assert all(0 <= p <= 1 for p in probs) and len(set(probs)) > 1


def recording_wandb(tmp_path: Path) -> Path:
    """A stand-in for the `wandb` CLI that records its arguments (and, for `sync`, the history steps of
    each folder it was given, read when called) instead of uploading."""
    cli = tmp_path / "wandb"
    cli.write_text(f"""#!{sys.executable}
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from dcgan_dist.report.wandb_file import history
args = sys.argv[1:]
if args == ["sync", "--help"]:
    print("Usage: wandb sync [OPTIONS] [PATHS]...\\n  --id TEXT  Upload to an existing run ID.")
    sys.exit(0)
steps = [[row["_step"] for row in history(next(Path(a).glob("run-*.wandb")))] for a in args if Path(a).is_dir()]
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps({{"args": args, "steps": steps}}) + "\\n")
""")
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    return cli


def test_sync_uploads_the_two_segments_as_one_run_each_step_once(dashboard, tmp_path):
    STEPS = dashboard["steps"]
    run_dir, cli = dashboard["run_dir"], recording_wandb(tmp_path)
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    cmd = [sys.executable, "launch/wandb_sync.py", run_dir, "--wandb", cli]
    out = run(cmd, env={**os.environ, "WANDB_API_KEY": KEY}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (call,) = [json.loads(ln) for ln in (tmp_path / "calls.jsonl").read_text().splitlines()]
    args = call["args"]
    assert args[:5] == ["sync", "--id", run_id, "--project", "envproj"] and "--append" not in args
    first, second = args[5:]
    assert Path(first).name == dashboard["segments"][0].name and Path(second) == dashboard["segments"][1]
    resumed_from = wandb_config(dashboard["files"][1])["run"]["start_step"]
    assert resumed_from == CKPT_EVERY and resumed_from <= dashboard["killed_at"]
    original = [row["_step"] for row in history(dashboard["files"][0])]
    assert max(original) > resumed_from                       # the first segment ran past its checkpoint
    uploaded = call["steps"][0] + call["steps"][1]
    assert max(call["steps"][0]) == resumed_from and min(call["steps"][1]) > resumed_from
    assert uploaded == sorted(set(uploaded)) and set(uploaded) >= set(range(1, STEPS + 1))
    assert "lost" not in out.stdout
    assert Path(first).is_relative_to(run_dir / "wandb" / "sync")       # a trimmed copy, the original kept
    assert [row["_step"] for row in history(dashboard["files"][0])] == original
    again = run(cmd, env={**os.environ, "WANDB_API_KEY": KEY}, timeout=120)
    assert again.returncode == 0 and "nothing to upload" in again.stdout
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 1


def test_sync_without_a_key_uploads_nothing_and_says_so(dashboard, tmp_path):
    cli = recording_wandb(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    out = run([sys.executable, "launch/wandb_sync.py", dashboard["run_dir"], "--wandb", cli, "--all"],
              env={**env, "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 1 and "no W&B API key" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "calls.jsonl").exists()


@pytest.mark.parametrize("ref, key, expected", [
    ("wandb:just-a-name", None, "expected wandb:[ENTITY/]PROJECT/NAME:ALIAS"),
    ("wandb:me/proj/generator-1a2b:best", None, "needs an API key"),
    ("wandb:me/proj/generator-1a2b:best", KEY, "the W&B server 127.0.0.1:9 does not answer")])
def test_generate_names_a_bad_or_unreachable_artifact_reference_in_one_line(tmp_path, ref, key, expected):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update({"HOME": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9"}, **({"WANDB_API_KEY": key} if key else {}))
    out = run([sys.executable, "launch/generate.py", "--checkpoint", ref, "--output", tmp_path / "x.png"],
              env=env, timeout=120)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert ref in line and expected in line


def test_a_run_file_is_rewritten_byte_for_byte(dashboard, tmp_path):
    from dcgan_dist.report.wandb_file import BLOCK, read_payloads, write_payloads

    source = dashboard["files"][1]
    assert source.stat().st_size > BLOCK                   # records cross a block boundary
    header, payloads = read_payloads(source)
    write_payloads(tmp_path / "copy.wandb", header, payloads)
    assert (tmp_path / "copy.wandb").read_bytes() == source.read_bytes()


def test_the_plan_names_rows_that_a_kill_took_from_the_w_and_b_files(dashboard, tmp_path):
    from dcgan_dist.report.wandb_file import parse, read_payloads, write_payloads

    run_dir = tmp_path / "run"
    shutil.copytree(dashboard["run_dir"], run_dir, ignore=shutil.ignore_patterns("checkpoints", "data", "sync", "synced.json"))
    segment = next((run_dir / "wandb").glob(dashboard["segments"][0].name + "/run-*.wandb"))
    header, payloads = read_payloads(segment)               # as if wandb had written it last at step 20
    write_payloads(segment, header, [p for p in payloads
                                     if kind(r := parse(p)) != "history" or history_step_of(r) <= 20])
    out = run([sys.executable, "launch/wandb_sync.py", run_dir, "--dry-run"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"lost the rows of step(s) 21-{CKPT_EVERY}" in out.stdout
    assert "steps 0-20" in out.stdout


def history_step_of(rec) -> int:
    from dcgan_dist.report.wandb_file import history_step

    return history_step(rec)
