"""What the trainer reads from run folders, shard sets and servers it does not control (docs/TRUST.md):
no code from checkpoints or manifests, checked bytes, bounded memory and time, ranks that agree,
caches keyed by what they came from, no secret in anything saved or logged. Real files, real servers,
real launches; each test fails on the code before these checks."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import accelerate_launch, checkpoint_nets, run
from conftest import read_metrics as metrics
from dcgan_dist.data import remote
from dcgan_dist.data.shards import ShardSet, fetch_shard, read_manifest, Sharding, write_shards
from dcgan_dist.data.stream import ShardError, decode_block, read_shards
from dcgan_dist.errors import UserError
from dcgan_dist.redact import redact
from shard_server import ShardServer
from test_cluster import free_port, logs, start_machines, train_keys
from test_faults import assert_same_trace, fp32_args, kill_group, last_step, start, wait_for, workers

FAST = {"DCGAN_REMOTE_ATTEMPTS": "3", "DCGAN_REMOTE_BACKOFF_S": "0.05"}


def one_error(out: str) -> str:
    """The one `error:` line of a job's stderr. No traceback may come from the product's code (the
    launcher prints one of its own, ChildFailedError, whenever a rank exits non-zero)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    ours = [ln for ln in out.splitlines() if ln.strip().startswith('File "') and ("dcgan_dist" in ln or "train.py" in ln)]
    assert len(lines) == 1 and not ours, out[-3000:]
    return lines[0]


def train_once(shards, run_dir, steps=3, env=None, **over) -> subprocess.CompletedProcess:
    """One process, plain python: for what does not need several ranks."""
    args = fp32_args(shards, run_dir, steps=steps, **{"wandb.mode": "disabled", "data.num_workers": 0, **over})
    return run([sys.executable, *args[2:]], env={**os.environ, **FAST, **(env or {})}, timeout=300)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: no pickle is ever run


class Payload:
    """Unpickled by a loader that runs code, it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def to_legacy(ckpt: Path, payload: Path) -> None:
    """Rewrite a checkpoint in the layout an early development version wrote through Accelerate
    (model.safetensors, optimizer.bin, random_states_N.pkl, custom_checkpoint_0.pkl: torch.save pickles),
    every pickle one that runs code when loaded by a loader that runs code."""
    from safetensors.torch import save_file

    tensors = checkpoint_nets(ckpt)
    save_file({k[2:]: v.contiguous() for k, v in tensors.items() if k.startswith("G.")}, ckpt / "model.safetensors")
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "optimizer_1.bin", "random_states_0.pkl"):
        torch.save(Payload(payload), ckpt / name)
    for name in ("nets.safetensors", "optimizers.safetensors", "rng-0.json"):
        (ckpt / name).unlink()
    (ckpt / "COMPLETE").write_text(f"step {json.loads((ckpt / 'trainer_state.json').read_text())['step']}\n")


def test_a_pickle_in_a_checkpoint_never_runs_and_an_old_layout_is_one_error_line(shards32, tmp_path):
    """One process: resuming across ranks is the lagging-view test's subject, this is about the files."""
    straight, run_dir, marker = tmp_path / "straight", tmp_path / "run", tmp_path / "PWNED"
    assert train_once(shards32, straight, steps=9).returncode == 0
    out = train_once(shards32, run_dir, steps=6)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = run_dir / "checkpoints"

    # The current layout never opens a pickle at all: one dropped in under Accelerate's names is ignored.
    newest = ckpts / "step-00000006"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt"):
        torch.save(Payload(marker), newest / name)
    out = train_once(shards32, run_dir, steps=9)
    assert out.returncode == 0 and f"resuming from {newest}" in out.stdout, out.stderr[-3000:]
    assert "skipping unreadable checkpoint" not in out.stderr and not marker.exists()
    assert_same_trace(metrics(run_dir), metrics(straight), "resumed past pickles dropped into a checkpoint")

    # An edit that leaves valid JSON of the same length: only the digest in COMPLETE tells.
    state = ckpts / "step-00000009" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 9', '"step": 8'))
    out = train_once(shards32, run_dir, steps=9)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainer_state.json does not match the size and sha256 in COMPLETE" in out.stderr
    assert f"resuming from {ckpts / 'step-00000006'}" in out.stdout

    # A checkpoint in the layout of a development version that no release wrote: one line saying what to do.
    to_legacy(ckpts / "step-00000009", marker)
    out = train_once(shards32, run_dir, steps=12)
    assert out.returncode != 0 and not marker.exists()
    line = one_error(out.stderr)
    assert f"checkpoint {ckpts / 'step-00000009'} is in the layout of an early development version" in line
    assert "move checkpoints/ aside to start over" in line


# ----------------------------------------------------------------------------------------------------
# Shard names are data, never code


def copy_set(shards32: Path, dest: Path) -> Path:
    shutil.copytree(shards32, dest)
    return dest


def edit_manifest(d: Path, edit) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.mark.parametrize("name", ["all-000001.tar$(touch {marker})", "`touch {marker}`.tar", "../train-000000.tar",
                                  "/etc/train-000000.tar", "train 0.tar", "-rf.tar"])
def test_a_manifest_name_that_is_not_a_plain_file_name_refuses_the_set(shards32, tmp_path, name):
    marker = tmp_path / "PWNED"
    d = copy_set(shards32, tmp_path / "my set")                    # a space in the folder, as users have
    bad = name.format(marker=marker)
    edit_manifest(d, lambda m: m["shards"][0].update(name=bad))
    templates = [f"pipe:cat '{d}/{{name}}'", f'pipe:cat "{d}/{{name}}"', f"pipe:cat {str(d).replace(' ', chr(92) + ' ')}/{{name}}"]
    for location in [str(d), *templates]:
        with pytest.raises(UserError) as err:
            read_manifest(location)
        assert f"shard entry 0 has name {bad[:80]!r}: expected a plain file name" in str(err.value), location
    if name.startswith("all-"):                                    # the launch itself, once: one line, exit 1
        out = train_once(d, tmp_path / "run")
        assert out.returncode == 1 and "shard entry 0 has name" in one_error(out.stderr)
    assert not marker.exists()


@pytest.mark.parametrize("quote", ["'", '"', ""])
def test_a_pipe_template_passes_the_name_as_one_argument_whatever_its_quotes(shards32, tmp_path, quote):
    marker = tmp_path / "PWNED"
    d = copy_set(shards32, tmp_path / "my set")
    folder = str(d) if quote else str(d).replace(" ", "\\ ")
    location = f"pipe:cat {quote}{folder}/{{name}}{quote}"
    good = ShardSet.open(location).shards[0]
    assert hashlib.sha256(remote.fetch(location, good.name, good.bytes)).hexdigest() == good.sha256
    for evil in (f"x$(touch {marker}).tar", f"x`touch {marker}`.tar", f"x;touch {marker};.tar", f"x' ; touch {marker} '.tar"):
        with pytest.raises(OSError, match="'cat' exited 1: cat: "):
            remote.fetch(location, evil, 10)                       # cat was asked for that literal file name
        assert not marker.exists(), evil


def test_a_pipe_upload_gets_the_file_on_stdin_and_may_print_a_reply(tmp_path):
    """The documented way to need a shell: the name as an argument ($1), never pasted into the script."""
    location = f"pipe:sh -c 'cat > \"$1\" && echo stored \"$1\"' _ {tmp_path}/{{name}}"
    remote.upload(location, "train-000000.tar", b"tar bytes")
    assert (tmp_path / "train-000000.tar").read_bytes() == b"tar bytes"
    remote.upload(location, "x $(touch PWNED).tar", b"odd")                 # one argument, not shell text
    assert (tmp_path / "x $(touch PWNED).tar").read_bytes() == b"odd" and not Path("PWNED").exists()


# ----------------------------------------------------------------------------------------------------
# Hostile shards: bounded memory, counted skips, never a traceback


def rewrite_shard(d: Path, name: str, members: list[tuple[str, bytes]], compress: bool = False) -> None:
    """Replace shard `name` with these members, and re-sign the manifest, as whoever made a hostile set would."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (d / name).write_bytes(buf.getvalue())
    data = buf.getvalue()
    edit_manifest(d, lambda m: next(e for e in m["shards"] if e["name"] == name).update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def forged_header(npy: bytes, images: int) -> bytes:
    """The same pixels behind a header that claims `images` images."""
    f = io.BytesIO(npy)
    np.lib.format.read_magic(f)
    shape, _, _ = np.lib.format.read_array_header_1_0(f)
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": (images, *shape[1:])})
    return out.getvalue() + npy[f.tell():]


@pytest.fixture
def hostile_set(shards32, tmp_path):
    """Shard 0: a block whose header claims 10,000,000 images. Shard 1: a gzip stream whose one member
    inflates 1000x. Shard 2: a .json member larger than any block's. Shard 3 is intact. The manifest
    matches every byte: checksums cannot tell a hostile set from an honest one."""
    d = copy_set(shards32, tmp_path / "hostile")
    first = members_of(d / "train-000000.tar")
    rewrite_shard(d, "train-000000.tar", [(first[0][0], forged_header(first[0][1], 10_000_000)), *first[1:]])
    rewrite_shard(d, "train-000001.tar", [("000100.npy", b"\0" * (48 << 20))], compress=True)
    third = members_of(d / "train-000002.tar")
    rewrite_shard(d, "train-000002.tar", [*third[:2], ("999999.json", b" " * (16 * 8192 + 1)), *third[2:]])
    return d


def test_hostile_shards_cost_no_memory_and_are_counted_skips(hostile_set):
    shard_set = ShardSet.open(hostile_set)
    assert (hostile_set / "train-000001.tar").stat().st_size < (100 << 10)      # 48 MB behind 50 KB of gzip
    errors = []
    blocks = sum(1 for s in read_shards(shard_set, list(shard_set.shards),
                                        lambda where, exc: errors.append((where, str(exc)))))
    assert blocks > 0
    assert [Path(w).name for w, _ in errors] == ["train-000001.tar", "train-000002.tar"]
    assert "gzip-compressed: shards are uncompressed tars" in errors[0][1]
    assert "member '999999.json' holds 131073 bytes, more than a .json member of this set can (131072)" in errors[1][1]
    npy = members_of(hostile_set / "train-000000.tar")[0][1]
    with pytest.raises(ShardError, match="the block's header claims 10000000 images but 49152 bytes follow it"):
        decode_block(npy, 32)


def test_training_on_a_hostile_set_goes_on_and_counts_every_skip(hostile_set, tmp_path):
    out = train_once(hostile_set, tmp_path / "run", steps=20)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "MemoryError" not in out.stderr
    for needle in ("header claims 10000000 images", "gzip-compressed", "more than a .json member"):
        assert needle in out.stderr, needle
    assert metrics(tmp_path / "run")[-1]["data_errors"] >= 3


# ----------------------------------------------------------------------------------------------------
# Downloads: checked bytes, capped reads, one deadline, no scheme change, no retry on 4xx


@pytest.fixture
def served(shards32, tmp_path):
    shutil.copytree(shards32, tmp_path / "www" / "celeba32")
    with ShardServer(tmp_path / "www") as server:
        yield server, server.url("celeba32/")


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "ATTEMPTS", 3)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_a_body_cut_short_without_an_error_is_retried_never_cached(served, tmp_path, fast_retries):
    server, url = served
    shard = ShardSet.open(url).shards[1]
    server.short[shard.name] = 1                          # no Content-Length, half the body, a clean close
    assert hashlib.sha256(fetch_shard(shard, tmp_path / "cache")).hexdigest() == shard.sha256
    assert server.gets.count(f"/celeba32/{shard.name}") == 2
    server.short[shard.name] = 10**6
    error = fetch_shard(shard, tmp_path / "other")
    assert isinstance(error, OSError) and f"cut short: {shard.bytes // 2} of the {shard.bytes} bytes" in str(error)
    assert "(tried 3 times)" in str(error) and not list((tmp_path / "other").glob("*"))


def test_a_truncated_shard_over_http_and_through_pipe_cat_is_counted_and_not_cached(served, shards32, tmp_path):
    server, url = served
    server.short["train-000002.tar"] = 10**6
    out = train_once(url, tmp_path / "http", steps=8, **{"data.cache_dir": tmp_path / "cache1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping unreadable data in shard" in out.stderr and "cut short" in out.stderr
    assert metrics(tmp_path / "http")[-1]["data_errors"] >= 1
    bad = next(s for s in ShardSet.open(url).shards if s.name == "train-000002.tar")
    assert sorted(p.stem for p in (tmp_path / "cache1").glob("*.tar")) == sorted(
        s.sha256 for s in ShardSet.open(url).shards if s.name != bad.name)

    d = copy_set(shards32, tmp_path / "piped")
    victim = d / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:4096])            # cat exits 0 with what there is
    out = train_once(f"pipe:cat {d}/{{name}}", tmp_path / "pipe", steps=8, **{"data.cache_dir": tmp_path / "cache2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"cut short: 4096 of the {bad.bytes} bytes its manifest gives" in out.stderr
    assert metrics(tmp_path / "pipe")[-1]["data_errors"] >= 1
    assert not (tmp_path / "cache2" / f"{bad.sha256}.tar").exists()


def test_a_cached_copy_that_changed_is_downloaded_again(served, tmp_path):
    server, url = served
    shard = ShardSet.open(url).shards[0]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{shard.sha256}.tar").write_bytes(b"\0" * shard.bytes)  # right name and size, wrong bytes
    before = server.gets.count(f"/celeba32/{shard.name}")
    assert hashlib.sha256(fetch_shard(shard, cache)).hexdigest() == shard.sha256
    assert server.gets.count(f"/celeba32/{shard.name}") == before + 1
    assert hashlib.sha256((cache / f"{shard.sha256}.tar").read_bytes()).hexdigest() == shard.sha256


def test_http_reads_are_capped_bounded_in_time_and_never_change_scheme(served, monkeypatch, fast_retries):
    server, url = served
    shard = ShardSet.open(url).shards[0]
    server.endless[shard.name] = 1                       # the file, then zeros for ever
    with pytest.raises(OSError, match=f"more than the {shard.bytes} bytes expected"):
        remote.fetch(url, shard.name, shard.bytes)
    monkeypatch.setattr(remote, "TIMEOUT_S", 1.0)
    server.trickle[shard.name] = 1                       # 64 bytes every 0.2 s: each read is quick, the whole is not
    t0 = time.monotonic()
    with pytest.raises(OSError, match="not finished within its deadline"):
        remote.fetch(url, shard.name, shard.bytes)
    assert time.monotonic() - t0 < 5
    server.redirect[shard.name] = f"https://127.0.0.1:{server.port}/celeba32/{shard.name}"
    gets = len(server.gets)
    with pytest.raises(OSError, match=r"refused a redirect from http to https .*\(not retried\)"):
        remote.with_retries(lambda: remote.fetch(url, shard.name, shard.bytes), shard.name)
    assert len(server.gets) == gets + 1
    server.redirect[shard.name] = server.url("celeba32/train-000003.tar")     # same scheme: followed
    assert len(remote.fetch(url, shard.name)) == (server.root / "celeba32/train-000003.tar").stat().st_size
    del server.redirect[shard.name]
    gets = len(server.gets)
    with pytest.raises(OSError, match=r"HTTP 404 .*\(not retried\)"):
        remote.with_retries(lambda: remote.fetch(url, "train-999999.tar", 100), "train-999999.tar")
    assert len(server.gets) == gets + 1


def test_shard_tool_keeps_only_a_few_finished_shards_on_local_disk(celeba_parent, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    waiting = []
    with ShardServer(tmp_path / "www") as server:
        server.put_delay_s = 0.3                          # uploads slower than the encoding
        server.on_put = lambda name: waiting.append(len(list(tmp.glob("dcgan-shards-*/*.tar"))))
        out = run([sys.executable, "launch/shard.py", "--input", celeba_parent, "--output", server.url("up/s"),
                   "--resolution", "32", "--shard-size", "20", "--workers", "2", "--images-per-block", "16"],
                  env={**os.environ, "TMPDIR": str(tmp)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len([w for w in waiting if w]) == 10 and max(waiting) <= 3, waiting     # workers + 1, of 10 shards


# ----------------------------------------------------------------------------------------------------
# Ranks agree


def test_ranks_resume_together_when_one_machine_cannot_see_the_newest_checkpoint(shards32, tmp_path):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare --mount) to give machine 1 a lagging view")
    run_dir = tmp_path / "run"
    one_rank = {"CPU_RANKS_PER_MACHINE": "1"}
    first = start_machines(train_keys(shards32, run_dir, steps=4, **{"train.ckpt_every": 2}), free_port(),
                           tmp_path, "first", env=one_rank)
    assert [m.wait(timeout=300) for m in first] == [0, 0], logs(tmp_path, "first", 0)[1][-3000:]
    hidden = run_dir / "checkpoints/step-00000004"
    (tmp_path / "empty").mkdir()
    # Machine 1's view of run_dir lags, as an NFS client's can: the newest checkpoint is not there yet.
    lagging = ["unshare", "--mount", "--propagation", "private", "bash", "-c",
               'mount --bind "$0" "$1" && shift && exec "$@"', str(tmp_path / "empty"), str(hidden)]
    second = start_machines(train_keys(shards32, run_dir, steps=6, **{"train.ckpt_every": 2}), free_port(),
                            tmp_path, "second", env=one_rank, prefix={1: lagging})
    try:
        codes = [m.wait(timeout=300) for m in second]
    finally:
        for m in second:
            if m.poll() is None:
                kill_group(m)
    out0, err0 = logs(tmp_path, "second", 0)
    assert codes == [0, 0], err0[-3000:] + logs(tmp_path, "second", 1)[1][-3000:]
    assert f"warning: skipping unreadable checkpoint {hidden} (rank 1: no such file: COMPLETE)" in err0
    assert f"resuming from {run_dir / 'checkpoints/step-00000002'}" in out0
    replicas = json.loads((run_dir / "checkpoints/step-00000006/replicas.json").read_text())
    assert replicas["ranks"] == 2 and len(set(replicas["digest"].values())) == 1


def test_a_slow_source_on_rank_0_does_not_time_the_others_out(served, tmp_path):
    server, url = served
    for name in ("train-000000.tar", "train-000002.tar"):           # rank 0's half: 11 s, over the 10 s timeout
        server.slow[name] = 5.5
    run_dir = tmp_path / "run"
    args = fp32_args(url, run_dir, steps=3, **{"data.verify_remote": True, "data.cache_dir": tmp_path / "cache",
                                               "train.collective_timeout_s": 10})
    out = accelerate_launch(args, env={**os.environ, **FAST}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not server.slow and last_step(run_dir) == 3


def test_a_peer_that_stops_answering_is_one_line_not_a_traceback(shards32, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(fp32_args(shards32, run_dir, steps=100000, **{"train.collective_timeout_s": 10}))
    try:
        wait_for(lambda: last_step(run_dir) >= 3, proc, what="step 3")
        ranks = workers(proc)
        ranks[1].suspend()                                  # SIGSTOP: alive, holding its sockets, silent
        t0 = time.time()
        try:
            ranks[0].wait(timeout=60)                       # the collective times out after 10 s
        except psutil.TimeoutExpired:
            raise AssertionError("rank 0 kept waiting on a silent peer") from None
        assert time.time() - t0 < 60
        ranks[1].kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    line = one_error(stderr)
    assert line.startswith("error: lost contact with another rank of this 2-rank job (")
    assert "no answer within train.collective_timeout_s=10" in line


# ----------------------------------------------------------------------------------------------------
# Caches are keyed by what they were computed from


def reshard_in_place(celeba_parent: Path, tmp_path: Path, d: Path, seed: int) -> None:
    from dcgan_dist.data.celeba import open_source
    from dcgan_dist.data.synthetic import write_celeba

    source = tmp_path / f"faces-{seed}"
    write_celeba(source, num=240, seed=seed, progress=False)
    write_shards(open_source(source, "train"), d,
                 Sharding(resolution=32, split="train", shard_size=50, workers=1, progress=False, images_per_block=16))


def test_the_classifier_beside_the_shards_follows_the_manifest(celeba_parent, shards32, tmp_path):
    """The Inception features cached beside the shards: tests/test_evaluate.py, through the one scoring path."""
    from dcgan_dist.eval.attributes import CACHE_NAME, classifier_for

    d = copy_set(shards32, tmp_path / "set")
    digests = []
    for seed in (None, 7):
        if seed is not None:
            reshard_in_place(celeba_parent, tmp_path, d, seed)
        digests.append(ShardSet.open(d).digest)
        _, meta = classifier_for(d)
        assert meta["manifest_digest"] == digests[-1]
        written = (d / CACHE_NAME).stat().st_mtime_ns
        assert classifier_for(d)[1] == meta and (d / CACHE_NAME).stat().st_mtime_ns == written   # read, not retrained
    assert digests[0] != digests[1]


# ----------------------------------------------------------------------------------------------------
# Secrets stay out of what is saved or logged


def test_redaction_keeps_references_and_masks_values():
    cases = {
        "https://u:hunter2@h/p/": "https://u:***@h/p/",
        "https://h/p/?token=abc&X-Amz-Signature=def": "https://h/p/?token=***&X-Amz-Signature=***",
        'pipe:curl -H "Authorization: Bearer eyJhbGci" https://h/{name}': 'pipe:curl -H "Authorization: Bearer ***" https://h/{name}',
        'pipe:curl -H "Authorization: Bearer $TOKEN" https://h/{name}': 'pipe:curl -H "Authorization: Bearer $TOKEN" https://h/{name}',
        "pipe:env API_KEY=abc123 cat /d/{name}": "pipe:env API_KEY=*** cat /d/{name}",
        "pipe:curl -u me:pw https://h/{name}": "pipe:curl -u me:*** https://h/{name}",
        "pipe:tool --token xyz --token-file /run/t {name}": "pipe:tool --token *** --token-file /run/t {name}",
        "s3://bucket/celeba64/": "s3://bucket/celeba64/",
        "data/shards/demo64": "data/shards/demo64",
    }
    for given, expected in cases.items():
        assert redact(given) == expected, given


def secret_files(run_dir: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in run_dir.rglob("*"):
        if path.is_file() and any(s.encode() in path.read_bytes() for s in secrets):
            found.append(str(path.relative_to(run_dir)))
    return found


def test_credentials_in_data_shards_reach_the_server_and_nothing_else(served, shards32, tmp_path):
    server, _ = served
    server.require_auth, server.require_query = "dcgan:hunter2-password", "token=s3cr3t-query-token"
    secrets = ["hunter2-password", "s3cr3t-query-token"]
    url = f"http://dcgan:hunter2-password@127.0.0.1:{server.port}/celeba32/?token=s3cr3t-query-token"
    run_dir = tmp_path / "http"
    out = accelerate_launch(fp32_args(url, run_dir, steps=3, **{"train.ckpt_every": 3, "wandb.mode": "offline"}),
                            env={**os.environ, **FAST}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("GET", "/celeba32/train-000000.tar", "token=s3cr3t-query-token",
            "Basic ZGNnYW46aHVudGVyMi1wYXNzd29yZA==") in server.requests
    assert secret_files(run_dir, secrets) == [] and not any(s in out.stdout + out.stderr for s in secrets)
    saved = (run_dir / "config.yaml").read_text()
    assert f"http://dcgan:***@127.0.0.1:{server.port}/celeba32/?token=***" in saved
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))       # the W&B run was written, and scanned

    piped = f"pipe:env DCGAN_TEST_API_TOKEN=pipe-secret-9f2c cat {shards32}/{{name}}"
    out = train_once(piped, tmp_path / "pipe", steps=3, **{"wandb.mode": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert secret_files(tmp_path / "pipe", ["pipe-secret-9f2c"]) == [] and "pipe-secret-9f2c" not in out.stderr
    assert "DCGAN_TEST_API_TOKEN=***" in (tmp_path / "pipe" / "config.yaml").read_text()


# ----------------------------------------------------------------------------------------------------
# The run lock


def test_a_job_that_lost_its_lock_while_stopped_stops_before_its_next_save(shards32, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(fp32_args(shards32, run_dir, steps=100000, **{"train.ckpt_every": 4}))
    try:
        wait_for(lambda: (run_dir / "checkpoints/step-00000004/COMPLETE").is_file(), proc, what="a checkpoint")
        holder = workers(proc)[0]
        holder.suspend()                                    # stalls: no heartbeat, no steps
        stopped_at = last_step(run_dir)
        # ... long enough for a job elsewhere to find the heartbeat stale and take run_dir over:
        (run_dir / "LOCK").write_text(json.dumps({"host": "gpu-node-9", "pid": 77, "pid_ns": "pid:[1]",
                                                  "start_ticks": 1, "job": "", "since": "now"}) + "\n")
        before = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        holder.resume()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode != 0
    line = one_error(stderr)
    assert line.startswith(f"error: this job lost the lock on run_dir '{run_dir}' (now held by host gpu-node-9, pid 77")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == before
    assert last_step(run_dir) <= stopped_at + 4                  # it trained on to its next save, not past it
    assert json.loads((run_dir / "LOCK").read_text())["host"] == "gpu-node-9"    # the new holder's lock is left alone
