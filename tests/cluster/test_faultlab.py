"""The real-process fault harness: its proxy, its checkers, and seeded histories.

- the proxy really cuts, stalls (one way or both), delays and resets a link;
- each checker reports the anomaly it is there for (checked on made-up snapshots);
- a bounded set of seeded histories (3 nodes and a spare that joins and may leave,
  client operations under link and process faults) ends with no anomaly.

``CAIRN_SOAK_MINUTES=<m>`` runs the soak instead for that long and prints its table
(the same as ``python tests/cluster/faultlab/soak.py --minutes m``).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultlab.checkers import Snapshot, blob_problems, check_all
from faultlab.history import History, Monitor, Op
from faultlab.proxy import ProxyHub
from faultlab.runner import RunSettings, run_history
from faultlab.schedule import make_schedule
from faultlab.soak import soak

SOAK_MINUTES = float(os.environ.get("CAIRN_SOAK_MINUTES", "0") or 0)
#: Seeds CI runs (each a full history on 3 real nodes plus a spare).
CI_SEEDS = (2,)
#: Seeds that once found a defect, kept as regression tests (see docs/reliability.md).
REGRESSION_SEEDS: tuple[int, ...] = ()


# -- the proxy ----------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on loopback; yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield int(srv.getsockname()[1])
    stop.set()
    srv.close()


def _client(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _silent(s: socket.socket) -> bool:
    """Nothing arrives within half a second (a stalled direction)."""
    s.settimeout(0.5)
    try:
        s.recv(100)
    except TimeoutError:
        return True
    finally:
        s.settimeout(10)
    return False


def test_the_proxy_cuts_stalls_delays_and_resets_a_link(echo: int) -> None:
    hub = ProxyHub()
    try:
        link = hub.add("a", "b", echo)
        with _client(link.port) as c:
            c.sendall(b"plain")
            assert c.recv(100) == b"plain"
            hub.delay(link, 0.2)
            c.sendall(b"late")
            assert c.recv(100) == b"late"  # delayed, not lost, not reordered
            hub.heal(link)
            hub.one_way(link, "down")  # the dialler's bytes go out, answers wait
            c.sendall(b"held")
            assert _silent(c)
            hub.heal(link)
            assert c.recv(100) == b"held"
            hub.stall(link)
            c.sendall(b"both")
            assert _silent(c)
            hub.heal(link)
            assert c.recv(100) == b"both"
            hub.reset(link)
            with pytest.raises(ConnectionResetError):
                c.recv(100)
        hub.cut(link)
        # The reset may come as soon as the connect (a loaded machine) or at the first read.
        with pytest.raises(ConnectionResetError), _client(link.port) as c:
            c.sendall(b"x")
            c.recv(100)
        hub.heal(link)
        with _client(link.port) as c:
            c.sendall(b"again")
            assert c.recv(100) == b"again"
        assert link.stats.connections == 3 and link.stats.resets >= 2
    finally:
        hub.close()


# -- the checkers ---------------------------------------------------------------------------


def _snap(node: str, status: str = "success", **more: object) -> Snapshot:
    d = {"deployment_id": "d1", "project": "p", "status": status, "peer_results": []}
    s = Snapshot(node, deployments={"d1": d}, members=["n1", "n2"])
    s.newest_success = {"p": "d1"} if status == "success" else {}
    s.current = {"p": "d1"} if status == "success" else {}
    s.components = {
        "p": {"deployment_id": s.current.get("p"), "desired_deployment_id": s.current.get("p"),
              "nodes": []}
    }  # fmt: skip
    for k, v in more.items():
        setattr(s, k, v)
    return s


def _ack(history: History, status: int, deployment_id: str = "d1") -> None:
    history.ops.append(Op(0, "deploy", "n1", {}, 0.0, 1.0, status,
                          {"deployment_id": deployment_id}))  # fmt: skip


def test_each_checker_reports_its_anomaly(tmp_path: Path) -> None:
    h = History(0)
    assert check_all([_snap("n1"), _snap("n2")], h, None) == {}
    found = check_all([_snap("n1"), _snap("n2", "failed")], h, None)
    assert {"same_records", "same_release"} <= set(found)
    assert "all_terminal" in check_all([_snap("n1"), _snap("n2", "replicating")], h, None)
    _ack(h, 200)
    assert check_all([_snap("n1"), _snap("n2")], h, None) == {}
    assert "acknowledged" in check_all([_snap("n1", "failed"), _snap("n2", "failed")], h, None)
    h.ops.clear()
    _ack(h, 500)
    assert "acknowledged" in check_all([_snap("n1"), _snap("n2", "success")], h, None)
    h.ops[0].answer = {"deployment_id": "d1", "error": "injected fault at deploy.extract"}
    h.ops[0].status = 500
    assert "acknowledged" not in check_all([_snap("n1", "failed"), _snap("n2", "failed")], h, None)
    h.ops.clear()
    moved = _snap("n2")
    moved.current = {"p": "d0"}
    assert "same_release" in check_all([_snap("n1"), moved], h, None)
    files = _snap("n2", current_files={"p": {"index.html": b"other"}})
    assert "same_release" in check_all([_snap("n1"), files], h, None)
    blob = tmp_path / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not the bytes its name promises")
    bad = _snap("n2", bad_blobs=blob_problems(tmp_path / "blobs"))
    assert "blobs_intact" in check_all([_snap("n1"), bad], h, None)
    assert "no_refusals" in check_all([_snap("n1"), _snap("n2", refusals=["x"])], h, None)
    assert "no_leftovers" in check_all([_snap("n1"), _snap("n2", temp_files=["x"])], h, None)
    monitor = Monitor(lambda: [], h)
    monitor.observe("n1", "d1", "success")
    monitor.observe("n1", "d1", "replicating")
    monitor.observe("n2", "d1", "failed")
    assert len(check_all([_snap("n1"), _snap("n2")], h, monitor)["terminal_unchanged"]) == 2


def test_a_seed_picks_the_same_schedule() -> None:
    one = make_schedule(7, ["n1", "n2", "n3"], rounds=8, spares=["n4"])
    assert one == make_schedule(7, ["n1", "n2", "n3"], rounds=8, spares=["n4"])
    assert one != make_schedule(8, ["n1", "n2", "n3"], rounds=8, spares=["n4"])


# -- histories ------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(900)
@pytest.mark.skipif(SOAK_MINUTES > 0, reason="the soak runs instead")
@pytest.mark.parametrize("seed", [*CI_SEEDS, *REGRESSION_SEEDS])
def test_a_seeded_history_leaves_no_anomaly(seed: int, tmp_path: Path) -> None:
    result = run_history(seed, tmp_path / f"seed-{seed}", RunSettings(rounds=5))
    assert result.answered > 0
    assert not result.anomalies, result.report() + "\n" + result.logs


@pytest.mark.cluster
@pytest.mark.timeout(int(SOAK_MINUTES * 60) + 1800)
@pytest.mark.skipif(SOAK_MINUTES <= 0, reason="set CAIRN_SOAK_MINUTES to soak")
def test_soak(tmp_path: Path) -> None:
    table = soak(SOAK_MINUTES, out=tmp_path / "reports", work=tmp_path / "work")
    print(table.render())
    assert table.anomalies == 0, f"reports in {tmp_path / 'reports'}"
