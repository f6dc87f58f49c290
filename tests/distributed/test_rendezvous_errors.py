"""A rendezvous that cannot happen is one `error:` line naming the cause (host not found, connection refused,
another service on the port), never torch's C++ stack frames nor a question about the wrong cause."""
from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import run_cli, tiny_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous_error(tmp_path, capfd, addr: str, port: int) -> str:
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR=addr, MASTER_PORT=str(port),
               SIMCLR_DIST_TIMEOUT="2")
    r = run_cli("pretrain", *tiny_args(tmp_path), env=env)
    fd_err = capfd.readouterr().err  # what torch's C++ code wrote to the descriptor itself
    assert r.returncode == 2, r.stderr
    assert "frame #" not in r.stderr + fd_err and "[c10d]" not in fd_err and "Traceback" not in r.stderr, fd_err
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 "), r.stderr
    assert not (tmp_path / "logs").exists()
    return lines[0]


def test_a_mistyped_master_addr_says_host_not_found(tmp_path, capfd):
    line = _rendezvous_error(tmp_path, capfd, "no-such-host.invalid", _free_port())
    assert "host not found" in line and "MASTER_ADDR=no-such-host.invalid" in line, line
    assert "another service" not in line


def test_a_port_nobody_listens_on_says_connection_refused(tmp_path, capfd):
    port = _free_port()
    line = _rendezvous_error(tmp_path, capfd, "127.0.0.1", port)
    assert "connection refused" in line and f"127.0.0.1:{port}" in line, line
    assert "another service" not in line


def test_an_address_that_never_answers_says_timed_out(tmp_path, capfd, monkeypatch):
    """A wrong address or a firewall drops the connection attempts: no answer at all (simulated: every connect
    times out, as a dropped SYN does)."""
    def dropped(address, timeout=None, **kw):
        raise TimeoutError("timed out")
    monkeypatch.setattr(socket, "create_connection", dropped)
    line = _rendezvous_error(tmp_path, capfd, "127.0.0.1", _free_port())
    assert "timed out connecting to 127.0.0.1:" in line and "within 2 s" in line, line


@pytest.fixture
def chatty_service():
    """A port where another service answers every connection with an HTTP error (not a torch store)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join()
    server.close()


def test_another_service_on_master_port_is_named_without_cpp_frames(tmp_path, capfd, chatty_service):
    line = _rendezvous_error(tmp_path, capfd, "127.0.0.1", chatty_service)
    assert "another service" in line and "MASTER_PORT" in line, line


# ------------------------------------------------------------------------------------------------
# the continue line of a run over several nodes names this node's --node_rank
# ------------------------------------------------------------------------------------------------
def _spec_form(tmp_path, node_rank: int) -> list:
    return [*tiny_args(tmp_path), "--dist", "ddp", "--world_size", "2", "--node_rank", str(node_rank),
            "--dist_address", "127.0.0.1:29511"]


@pytest.mark.parametrize("node_rank", [0, 1])
def test_the_continue_line_of_a_multi_node_run_names_the_node_rank(tmp_path, monkeypatch, node_rank):
    """Observation: a multi-node run stopped by a signal said `continue with: simclr pretrain --resume RUN`;
    config.yaml holds node 0's --node_rank, so every node resumed as node 0."""
    from simclr import errors, launch, train
    monkeypatch.setattr(launch, "maybe_spawn", lambda cfg, argv, target: False)  # this process is the node's rank 0
    monkeypatch.setattr(train, "pretrain", lambda cfg, **kw: {"run_dir": str(tmp_path / "R"), "status":
                                                               "interrupted", "step": 3})
    r = run_cli("pretrain", *_spec_form(tmp_path, node_rank))
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("continue with:")]
    assert f"--resume {tmp_path / 'R'} --node_rank {node_rank} " in line and "0 to 1" in line, line

    def fails(cfg, **kw):
        e = errors.UserError("the data went away")
        e.run_dir = str(tmp_path / "R")
        raise e
    monkeypatch.setattr(train, "pretrain", fails)
    r = run_cli("pretrain", *_spec_form(tmp_path, node_rank))
    assert r.returncode == 2
    assert "continue with: " in r.stderr and f"--node_rank {node_rank} " in r.stderr, r.stderr


def test_the_continue_line_of_a_single_node_run_has_no_node_rank(tmp_path, monkeypatch):
    from simclr import train
    monkeypatch.setattr(train, "pretrain", lambda cfg, **kw: {"run_dir": str(tmp_path / "R"), "status":
                                                               "interrupted", "step": 3})
    r = run_cli("pretrain", *tiny_args(tmp_path))
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("continue with:")]
    assert line.endswith(f"pretrain --resume {tmp_path / 'R'}"), line
