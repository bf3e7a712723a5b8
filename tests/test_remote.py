"""Shard sets served over HTTP by a real server on 127.0.0.1 (tests/shard_server.py): training from a URL
equals training from the folder, dropped connections are retried or skipped and counted, a dead server
is one line, resume stays exact, and shard.py uploads. s3:// and gs:// build the right commands."""
import hashlib
import json
import os
import random
import shutil
import time

import pytest

from conftest import ROOT, accelerate_launch, run
from conftest import read_metrics as metrics
from dcgan_dist.data import remote
from dcgan_dist.data.shards import ShardSet, fetch_shard, read_manifest, verify
from dcgan_dist.data.stream import ordered_blocks
from shard_server import ShardServer
from test_faults import assert_same_trace, fp32_args, kill_group, last_step, start, wait_for

FAST_RETRIES = {"DCGAN_REMOTE_ATTEMPTS": "3", "DCGAN_REMOTE_BACKOFF_S": "0.1"}


@pytest.fixture(scope="module")
def served(shards32, tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(shards32, root / "celeba32")
    with ShardServer(root) as server:
        yield server, server.url("celeba32/")


@pytest.fixture(scope="module")
def local_trace(straight):
    """The first 12 steps of the uninterrupted local run: a 12-step run logs the same rows."""
    return metrics(straight)[:12]


def test_two_rank_run_from_http_equals_the_local_run_through_a_dropped_connection(served, local_trace, tmp_path):
    server, url = served
    server.drop["train-000001.tar"] = 1                 # cut once, half-way: the retry must make it whole
    run_dir = tmp_path / "run"
    out = accelerate_launch(fp32_args(url, run_dir, steps=12), env={**os.environ, **FAST_RETRIES}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{url}train-000001.tar: " in out.stderr and "retrying" in out.stderr
    assert server.drop["train-000001.tar"] == 0
    rows = metrics(run_dir)
    assert_same_trace(rows, local_trace, "http against local")
    assert rows[-1]["data_errors"] == 0
    snapshot = json.loads((run_dir / "run.json").read_text())
    assert snapshot["dataset_count"] == read_manifest(url)["count"]


def test_a_shard_that_keeps_failing_is_skipped_counted_and_named(served, tmp_path):
    server, url = served
    server.drop["train-000002.tar"] = 10**6
    try:
        run_dir = tmp_path / "run"
        out = accelerate_launch(fp32_args(url, run_dir, steps=6), env={**os.environ, **FAST_RETRIES}, timeout=300)
    finally:
        server.drop["train-000002.tar"] = 0
    assert out.returncode == 0, out.stderr[-3000:]
    assert metrics(run_dir)[-1]["data_errors"] >= 1
    assert f"skipping unreadable data in shard {url}train-000002.tar" in out.stderr
    assert "tried 3 times" in out.stderr


def test_server_down_at_start_is_one_line_and_non_zero(shards32, tmp_path):
    with ShardServer(tmp_path) as server:
        url = server.url("celeba32/")                  # a port that will have nobody behind it
    out = accelerate_launch(fp32_args(url, tmp_path / "run", steps=3), env={**os.environ, **FAST_RETRIES},
                            timeout=120)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(f"error: data.shards '{url}': cannot read '{url}manifest.json' (")
    assert "tried 3 times" in errors[0]


def test_resume_from_a_remote_set_is_exact_with_a_local_cache(served, local_trace, tmp_path):
    _, url = served
    run_dir = tmp_path / "run"
    args = fp32_args(url, run_dir, steps=12, **{"data.cache_dir": tmp_path / "cache"})
    kill_at = random.Random(int(os.environ.get("DCGAN_TEST_SEED", time.time()))).randint(4, 10)
    proc = start(args)
    wait_for(lambda: last_step(run_dir) >= kill_at, proc, what=f"step {kill_at}")
    kill_group(proc)
    out = accelerate_launch(args, timeout=300)
    assert out.returncode == 0 and "resuming from" in out.stdout, out.stderr[-3000:]
    assert_same_trace(metrics(run_dir), local_trace, f"remote resume after a kill at step {kill_at}")
    cached = list((tmp_path / "cache").glob("*.tar"))
    shas = {e["sha256"] for e in read_manifest(url)["shards"]}
    assert cached and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem in shas for p in cached)


def test_cache_serves_later_passes_without_downloading(served, tmp_path):
    server, url = served
    shards = ShardSet.open(url).shards
    before = len(server.gets)
    for _ in range(2):
        assert all(isinstance(fetch_shard(s, tmp_path), bytes) for s in shards)
    assert len(server.gets) == before + len(shards)      # each downloaded once; the second pass read local disk


def test_eval_and_verification_read_the_remote_set(served, shards32, tmp_path):
    server, url = served
    shards = list(ShardSet.open(url).shards)
    assert verify(ShardSet.open(url), shards) == {}
    assert verify(ShardSet.open(url, cache=str(tmp_path)), shards) == {}     # the check fills the cache...
    before = len(server.gets)
    assert all(isinstance(fetch_shard(s, tmp_path), bytes) for s in shards)
    assert len(server.gets) == before                    # ...so the loader downloads nothing again
    local = [b.tobytes() for b, _ in ordered_blocks(ShardSet.open(shards32))]
    assert [b.tobytes() for b, _ in ordered_blocks(ShardSet.open(url))] == local


def test_shard_tool_uploads_one_by_one_with_the_manifest_last(celeba_parent, shards32, tmp_path):
    with ShardServer(tmp_path) as server:
        out = run([os.sys.executable, "launch/shard.py", "--input", celeba_parent, "--output",
                   server.url("up/celeba32"), "--resolution", "32", "--shard-size", "50", "--workers", "2",
                   "--images-per-block", "16"], timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert server.puts[-1] == "manifest.json" and len(server.puts) == 5
        assert read_manifest(server.url("up/celeba32/"))["count"] == read_manifest(shards32)["count"]
    for name in server.puts:                           # the same bytes as sharding to a folder
        assert (tmp_path / "up/celeba32" / name).read_bytes() == (shards32 / name).read_bytes(), name


def test_pipe_form_reads_through_a_command(shards32):
    location = f"pipe:cat {shards32}/{{name}}"
    first = ShardSet.open(location).shards[0]
    assert first.path == f"pipe:cat {shards32}/train-000000.tar"
    data = remote.fetch(location, first.name, first.bytes)
    assert hashlib.sha256(data).hexdigest() == first.sha256
    with pytest.raises(Exception, match=r"needs '\{name\}'"):
        remote.member("pipe:cat /somewhere", "manifest.json")


def test_bucket_urls_build_the_cli_commands():
    assert remote.member("s3://bucket/celeba64/", "train-000003.tar") == "s3://bucket/celeba64/train-000003.tar"
    assert remote.member("gs://bucket/celeba64", "manifest.json") == "gs://bucket/celeba64/manifest.json"
    assert remote.read_command("s3://b/p/x.tar") == ["aws", "s3", "cp", "--only-show-errors", "s3://b/p/x.tar", "-"]
    assert remote.write_command("s3://b/p/x.tar") == ["aws", "s3", "cp", "--only-show-errors", "-", "s3://b/p/x.tar"]
    assert remote.read_command("gs://b/p/x.tar") == ["gcloud", "storage", "cat", "gs://b/p/x.tar"]
    assert remote.write_command("gs://b/p/x.tar") == ["gcloud", "storage", "cp", "-", "gs://b/p/x.tar"]
    assert all(remote.is_remote(u) for u in ("s3://b/", "gs://b/", "http://h/", "https://h/", "pipe:cat {name}"))
    assert not remote.is_remote("data/shards/demo64") and not remote.is_remote(ROOT)


def test_bucket_without_cli_or_fsspec_backend_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))             # no aws, no gcloud
    monkeypatch.setattr(remote, "fsspec_filesystem", lambda url: None)
    for url, cli in (("s3://bucket/celeba64/", "aws"), ("gs://bucket/celeba64/", "gcloud")):
        with pytest.raises(remote.PermanentError, match=f"'{cli}' not found: install it, or the fsspec backend"):
            remote.fetch(url, "manifest.json")


def test_bucket_goes_through_fsspec_when_its_backend_is_installed(monkeypatch):
    calls = []

    class FileSystem:                                     # stands in for s3fs/gcsfs, which are not installed here
        def cat_file(self, url, start=None, end=None):
            calls.append(("cat", url, start, end))
            return b"data"[start:end]

        def pipe_file(self, url, data):
            calls.append(("pipe", url, data))

    monkeypatch.setattr(remote, "fsspec_filesystem", lambda url: FileSystem())
    assert remote.fetch("gs://b/p/", "x.tar", 4) == b"data"
    with pytest.raises(OSError, match="cut short: 4 of the 9 bytes"):
        remote.fetch("gs://b/p/", "x.tar", 9)
    remote.upload("s3://b/p", "manifest.json", b"{}")
    assert calls == [("cat", "gs://b/p/x.tar", 0, 5), ("cat", "gs://b/p/x.tar", 0, 10),   # capped at size + 1
                     ("pipe", "s3://b/p/manifest.json", b"{}")]
