"""SIGTERM while pretraining is still setting up (scanning the data, waiting at the rendezvous) stops it at once:
there is nothing to save yet, and the first step may be hours away. Real processes: the signal is the point."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from tests.helpers.folder_runs import pretrain_args, tiny_folder

# the folder scan of a stalled file system, stood in for by a scan that never returns
_STALLED_SCAN = textwrap.dedent("""
    import sys, time
    from simclr.data import datasets
    def stalled(root):
        print("scanning", flush=True)
        time.sleep(3600)
    datasets.scan_folder = stalled
    from simclr.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _stopped_by_sigterm(p: subprocess.Popen, waiting_for) -> str:
    """Wait for ``waiting_for()``, send SIGTERM, return stderr; the 120 s bound the test, they are not asserted."""
    deadline = time.time() + 120
    while not waiting_for():
        assert p.poll() is None and time.time() < deadline, "the process did not reach its set-up wait"
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("SIGTERM did not stop a pretraining run that was still setting up")
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (signal 15)" in err and "Traceback" not in err, err
    return err


def test_sigterm_stops_a_stalled_data_scan(tmp_path, data_root):
    data = tiny_folder(tmp_path / "data", data_root, n_train=2, n_test=2)
    p = subprocess.Popen([sys.executable, "-c", _STALLED_SCAN, *map(str, pretrain_args(data, tmp_path / "logs"))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # the scan has begun
    assert "scanning" in line, p.communicate()[1]
    _stopped_by_sigterm(p, lambda: True)
    assert not (tmp_path / "logs").exists()


def test_sigterm_stops_a_rendezvous_that_never_answers(tmp_path, data_root):
    """MASTER_PORT is a service that accepts and never answers; SIMCLR_DIST_TIMEOUT is long (300 s)."""
    data = tiny_folder(tmp_path / "data", data_root, n_train=2, n_test=2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        silent.settimeout(0.1)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(silent.getsockname()[1]), WORLD_SIZE="2", RANK="1",
                   LOCAL_RANK="1", SIMCLR_DIST_TIMEOUT="300", OMP_NUM_THREADS="1")
        p = subprocess.Popen([sys.executable, "-m", "simclr", *map(str, pretrain_args(data, tmp_path / "logs"))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        accepted = []

        def connected() -> bool:  # the process is waiting for the silent store's handshake
            try:
                accepted.append(silent.accept()[0])
            except (socket.timeout, BlockingIOError):
                pass
            return bool(accepted)

        _stopped_by_sigterm(p, connected)
        for c in accepted:
            c.close()
    assert not (tmp_path / "logs").exists()
