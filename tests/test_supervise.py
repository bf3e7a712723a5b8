"""dcgan_dist.dist.supervise: which exit code a job gets, and that signals reach the ranks and not the
launcher. Real processes and real signals; the launcher here is a small stand-in with one child per
rank, as torchrun has (tests/test_deploy_*.py and test_cluster.py run the real one)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from dcgan_dist.dist.supervise import outcome

LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    # A rank: stops on SIGTERM with the code it is told, and reports it as launch/train.py does.
    rank = '''
    import os, signal, sys, time
    from dcgan_dist.errors import report_exit
    code = int(sys.argv[1])
    def stop(signum, frame):
        report_exit(code)
        sys.exit(code)
    signal.signal(signal.SIGTERM, stop)
    os.write(1, b"ready" + bytes([10]))      # one write: the two ranks share the pipe
    time.sleep(60)
    '''
    code = sys.argv[1]
    ranks = [subprocess.Popen([sys.executable, "-c", rank, code], env={**os.environ, "RANK": str(r)},
                              start_new_session=True) for r in (0, 1)]
    print("launcher", signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, flush=True)
    failed = max(r.wait() != 0 for r in ranks)
    # torchrun takes a moment to exit after its ranks; a SIGHUP then raises inside its exit.
    signal.signal(signal.SIGHUP, lambda *_: (print("launcher got SIGHUP", flush=True), sys.exit(9)))
    time.sleep(float(os.environ.get("LINGER_S", "0")))
    sys.exit(failed)
""")


def supervise(rank_code: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dcgan_dist.dist.supervise", "--", sys.executable, "-c", LAUNCHER,
                             str(rank_code)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize("rank_code, preempted, expected", [(0, None, 0), (0, "143", 143), (3, "143", 3)])
def test_sigterm_goes_to_the_ranks_and_the_code_says_what_happened(rank_code, preempted, expected):
    proc = supervise(rank_code, {"PREEMPTED_EXIT_CODE": preempted} if preempted else {})
    lines = sorted(proc.stdout.readline().strip() for _ in range(3))   # the three share one pipe
    assert lines == ["launcher True", "ready", "ready"]                 # the launcher ignores SIGTERM
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == expected, err
    assert f"dcgan-dist: stopped by SIGTERM, exit {expected}" in err


def test_a_launcher_still_exiting_after_its_ranks_is_left_alone():
    """Seen in the Docker test: the supervisor took a launcher with no ranks left for one still in its
    rendezvous and hung it up, and torchrun printed a SignalException traceback on its way out."""
    proc = supervise(0, {"LINGER_S": "2"})
    assert sorted(proc.stdout.readline().strip() for _ in range(3)) == ["launcher True", "ready", "ready"]
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "got SIGHUP" not in out, out + err


def test_a_signal_before_any_rank_started_ends_the_launcher():
    waiting = "import time; print('rendezvous', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-m", "dcgan_dist.dist.supervise", "--", sys.executable, "-c", waiting],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PREEMPTED_EXIT_CODE": "143"})
    assert proc.stdout.readline().strip() == "rendezvous"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.time() - t0 < 10


def test_a_bad_preempted_exit_code_is_one_line():
    out = subprocess.run([sys.executable, "-m", "dcgan_dist.dist.supervise", "--", "true"], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PREEMPTED_EXIT_CODE": "300"}, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip() == "error: PREEMPTED_EXIT_CODE='300': expected an exit code from 1 to 255, or unset"


@pytest.mark.parametrize("launcher, signalled, codes, preempted, expected", [
    (0, False, {"rank-0": 0}, 143, 0),                        # finished
    (1, False, {"rank-0": 3, "rank-1": 4}, 143, 3),          # a real failure keeps its own code
    (1, False, {"rank-0": 4, "rank-1": 4}, None, 4),         # another machine was lost
    (1, False, {"rank-0": 4}, 143, 143),                     # ... retryable where asked
    (1, True, {}, 143, 143),                                 # ranks killed by the signal itself
    (1, True, {"rank-0": 1}, 143, 1),                        # a rank failed while stopping
    (-9, False, {}, 143, 137),                               # the launcher was SIGKILLed (OOM)
])
def test_outcome(launcher, signalled, codes, preempted, expected):
    assert outcome(launcher, signalled, codes, preempted) == expected
