"""The run_dir lock on real files and real processes: held, stale by PID, stale by heartbeat."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from dcgan_dist.run import lock as runlock
from dcgan_dist.errors import RunStopped, UserError
from dcgan_dist.host import process_start_ticks
from dcgan_dist.run.lock import Holder, RunLock


def write_lock(path, holder: Holder, age_s: float = 0.0):
    path.write_text(json.dumps(holder.__dict__))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path / "LOCK", str(tmp_path))
    lock.acquire()
    held = json.loads((tmp_path / "LOCK").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "LOCK").exists()


def test_a_live_process_on_this_host_holds_it(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = Holder.me()
        write_lock(tmp_path / "LOCK", Holder(host=me.host, pid=other.pid, pid_ns=me.pid_ns,
                                             start_ticks=process_start_ticks(other.pid), since="then"),
                   age_s=3600)                 # an old heartbeat does not matter: the process is alive
        with pytest.raises(UserError) as err:
            RunLock(tmp_path / "LOCK", "runs/x").acquire()
        assert str(err.value) == (f"run_dir 'runs/x' is in use by a running job (host {me.host}, pid {other.pid}, "
                                  "since then); stop that job or choose another run_dir")
    finally:
        other.kill()
        other.wait()


def test_a_dead_or_reused_pid_on_this_host_is_stale(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Holder.me()
    write_lock(tmp_path / "LOCK", Holder(host=me.host, pid=dead.pid, pid_ns=me.pid_ns, start_ticks=1))
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    assert f"its process {dead.pid} is gone" in capsys.readouterr().err
    lock.release()
    # This very process, but a different start time: the PID was reused by someone else.
    write_lock(tmp_path / "LOCK", Holder(host=me.host, pid=os.getpid(), pid_ns=me.pid_ns, start_ticks=me.start_ticks + 1))
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    assert "now belongs to another process" in capsys.readouterr().err
    lock.release()


def test_another_machine_holds_it_until_its_heartbeat_stops(tmp_path, capsys):
    elsewhere = Holder(host="gpu-node-7", pid=4242, pid_ns="pid:[1]", since="then")
    write_lock(tmp_path / "LOCK", elsewhere, age_s=runlock.STALE_AFTER_S + 10)
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    assert "no heartbeat for" in capsys.readouterr().err
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.fixture
def quick_lock(monkeypatch):
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 1.5)
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)


def test_a_recent_heartbeat_from_elsewhere_is_waited_out_not_refused(tmp_path, capsys, quick_lock):
    """A pod restarted by Kubernetes right after a kill comes back in a new PID namespace, within seconds
    of its old heartbeat: it must wait for that heartbeat to go stale, not fail (and use up a retry)."""
    write_lock(tmp_path / "LOCK", Holder(host="pod-a", pid=1, pid_ns="pid:[9]", since="then"), age_s=0.2)
    t0 = time.monotonic()
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    waited = time.monotonic() - t0
    err = capsys.readouterr().err
    assert "note: run_dir 'runs/x' is locked by host pod-a, pid 1" in err and "waiting up to" in err
    assert "taking over a stale lock" in err and 1.0 <= waited < 5
    lock.release()


def test_a_heartbeat_that_beats_again_while_waiting_is_a_running_job(tmp_path, quick_lock):
    path = tmp_path / "LOCK"
    write_lock(path, Holder(host="gpu-node-7", pid=4242, pid_ns="pid:[1]", since="then"))
    stop = threading.Event()

    def beat():                                       # the other job, alive on its machine
        while not stop.wait(0.1):
            os.utime(path)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError, match="is in use by a running job .host gpu-node-7, pid 4242"):
            RunLock(path, "runs/x").acquire()
    finally:
        stop.set()
        beater.join()
    assert time.monotonic() - t0 < 1.0                 # refused at its next beat, not after the whole wait


def test_check_stops_a_holder_whose_lock_was_taken_over(tmp_path):
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    lock.check()                                       # still ours: nothing happens
    write_lock(tmp_path / "LOCK", Holder(host="gpu-node-7", pid=1, since="now"))
    with pytest.raises(RunStopped, match="this job lost the lock on run_dir 'runs/x' .now held by host gpu-node-7"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / "LOCK").read_text())["host"] == "gpu-node-7"


def test_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    then = time.time() - 3600
    os.utime(tmp_path / "LOCK", (then, then))
    time.sleep(0.5)
    assert time.time() - (tmp_path / "LOCK").stat().st_mtime < 5
    lock.release()


def test_release_leaves_someone_elses_lock(tmp_path):
    lock = RunLock(tmp_path / "LOCK", "runs/x")
    lock.acquire()
    write_lock(tmp_path / "LOCK", Holder(host="gpu-node-7", pid=1))
    lock.release()
    assert json.loads((tmp_path / "LOCK").read_text())["host"] == "gpu-node-7"
