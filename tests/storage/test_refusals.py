"""What apply does with entries it cannot simply apply: refused (not from its writer:
nothing stored, the log stops before it), quarantined (from its writer but against the
rules: recorded with its reason, stored, the log moves on), parked (too far ahead of this
node's clock: stored, applied once the clock catches up)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from storekit import (
    KEYRING,
    T0,
    HmacSigner,
    changelog_rows,
    deployment_fields,
    forge,
    inject,
    inject_raw,
    phash,
    pull,
    quarantine_rows,
    replicated_rows,
    snapshot,
)

from storage.accounts import Accounts
from storage.apply import Range, apply_batch, retry_parked
from storage.hlc import version_ms
from storage.rules import MAX_EVENT_SEQ
from storage.tables import DEPLOYMENTS
from storage.trim import TrimPolicy, trim

APPLIED, PARKED, QUARANTINED = 0, 1, 2


async def row_data(store, deployment_id):
    return DEPLOYMENTS.data(await store.get_row(DEPLOYMENTS, (deployment_id,)))


def new_deployment(**overrides):
    return {**deployment_fields(**overrides), "created_version": 1}


def user(**overrides):
    return {"username": "eve", "password_hash": phash("eve"), "role": "r", "active": True,
            "deleted": False, **overrides}  # fmt: skip


def batch(d_id, seq, *, origin="n1"):
    return {"deployment_id": d_id, "first_seq": seq, "last_seq": seq, "origin_node": origin,
            "events": [{"seq": seq, "t": T0, "event": "warning", "data": {}}]}  # fmt: skip


async def bad_entries(n1, ids):
    """``(tbl, key, data, op, reason)`` of entries n1 writes against the rules."""
    done, running = await row_data(n1, ids.done), await row_data(n1, ids.running)
    fresh = str(uuid.uuid4())
    huge = "scrypt$1048576$32$16$" + phash("x").split("$", 4)[4]
    return [
        ("deployments", fresh, new_deployment(deployment_id=fresh, project="a/b"), "upsert",
         "'project' must be a project name"),
        ("deployments", fresh, new_deployment(deployment_id=fresh, payload_hash="zz" * 32),
         "upsert", "'payload_hash' must be a sha256"),
        ("roles", "r5", {"role": "r5", "permission": 5, "deleted": False}, "upsert",
         "'permission' must be an object"),
        ("deployments", fresh, new_deployment(deployment_id=fresh, origin_node="n2"), "upsert",
         "written by their origin_node (n2), not by n1"),
        ("node_results", f"{ids.done}/n2",
         {"deployment_id": ids.done, "node": "n2", "status": "active", "phase": None,
          "error": None, "started_at": None, "completed_at": None, "late": False,
          "install_output": None}, "upsert", "written by their node (n2), not by n1"),
        ("pins", f"{ids.done}/n2", {"deployment_id": ids.done, "node": "n2", "pinned": False},
         "upsert", "written by their node (n2), not by n1"),
        ("payload_drops", f"{ids.done}/n2",
         {"deployment_id": ids.done, "node": "n2", "dropped_at": T0}, "upsert",
         "written by their node (n2), not by n1"),
        ("node_components", "n2/web",
         {"node": "n2", "project": "web", "deployment_id": None, "payload_hash": None,
          "activated_at": None, "converged": True, "reason": None, "process": None},
         "upsert", "written by their node (n2), not by n1"),
        ("deployments", ids.done, {**done, "user": "mallory"}, "upsert", "it never changes"),
        ("deployments", ids.done, {**done, "status": "failed"}, "upsert", "it never changes"),
        ("event_batches", f"{ids.running}/{10**15}", batch(ids.running, 10**15), "append",
         f"'first_seq' must be from 1 to {MAX_EVENT_SEQ}"),
        ("meta", "cluster_id", {"key": "cluster_id", "value": "evil"}, "upsert",
         "table 'meta' is not replicated"),
        ("users; DROP TABLE users", "x", {}, "upsert", "is not replicated"),
        ("deployments", ids.running, {**running, "status": "pending"}, "upsert",
         "cannot go from installing back to pending"),
        ("deployments", ids.running, {**running, "project": "api"}, "upsert",
         "project cannot change"),
        ("users", "eve", user(), "append", "users changes are upserts"),
        ("users", "eve", {k: v for k, v in user().items() if k != "active"}, "upsert",
         "must carry exactly its columns"),
        ("users", "eve", list(user().items()), "upsert", "must carry exactly its columns"),
        ("users", "mallory", user(), "upsert", "does not match its row"),
        ("users", "eve", user(password_hash=huge), "upsert", "scrypt parameters out of bounds"),
        ("members", "n7", {"name": "n7", "url": "http://n7", "deleted": False}, "upsert",
         "'url' must be wss://"),
        ("event_batches", f"{ids.running}/1",
         {**batch(ids.running, 1), "events": [{"seq": 1, "t": T0, "event": "pwned",
                                               "data": {}}]},
         "append", "unknown event 'pwned'"),
    ]  # fmt: skip


async def test_entries_against_the_rules_are_quarantined_one_by_one(history, open_store):
    n1, ids = history.store, history.ids
    n2, n3 = await open_store("n2"), await open_store("n3")
    cases = await bad_entries(n1, ids)
    bad = []
    accounts = Accounts(n1)
    for i, (tbl, key, data, op, _reason) in enumerate(cases):
        bad.append(await inject(n1, tbl, key, data, op=op))
        await accounts.put_member(f"m{i}", f"wss://m{i}.example:9933", by=None)
    bad.append(await inject_raw(n1, b"\xc1 not msgpack"))
    reasons = [c[4] for c in cases] + ["malformed entry"]

    got = await pull(n1, n2, max_entries=7)
    assert got.refused == []
    assert [(r.log_id, r.oseq) for r in got.quarantined] == [(n1.log_id, o) for o in bad]
    assert n2.logs.head(n1.log_id) == n1.logs.own_head
    rows = await quarantine_rows(n2)
    assert len(rows) == len(reasons)
    for row, oseq, reason in zip(rows, bad, reasons, strict=True):
        assert (row["peer"], row["writer"], row["log_id"], row["oseq"]) == (
            "n1", "n1", n1.log_id, oseq,
        )  # fmt: skip
        assert reason in row["reason"], (reason, row["reason"])
    # Every other entry of those batches applied; nothing of the bad ones did.
    assert await snapshot(n2) == await snapshot(n1)
    assert len(await Accounts(n2).list_members(include_deleted=True)) == 3 + len(cases)
    assert await Accounts(n2).get_role("r5") is None
    assert await n2.get_meta("cluster_id") is None
    # Quarantined entries are kept in the log, marked, so they travel on in order.
    states = {r["oseq"]: r["state"] for r in await changelog_rows(n2, n1.log_id)}
    assert {o for o, s in states.items() if s == QUARANTINED} == set(bad)
    assert len(states) == n1.logs.own_head

    relayed = await pull(n2, n3)
    assert [(r.oseq, r.quarantined) for r in relayed.refusals] == [(o, True) for o in bad]
    assert await snapshot(n3) == await snapshot(n1)
    assert {r["peer"] for r in await quarantine_rows(n3)} == {"n2"}


async def test_events_of_another_nodes_deployment_are_quarantined(open_store, create):
    n1, n2, n3 = await open_store("n1"), await open_store("n2"), await open_store("n3")
    d = await create(n1)
    await n1.write_deployment(d.deployment_id, events=[("phase", {"phase": "ingest"})])
    await pull(n1, n2)
    # n2 writes events into n1's deployment, naming itself as the origin.
    await inject(n2, "event_batches", f"{d.deployment_id}/2", batch(d.deployment_id, 2,
                 origin="n2"), op="append")  # fmt: skip
    await pull(n1, n3)
    got = await pull(n2, n3)
    assert [r.quarantined for r in got.refusals] == [True]
    assert "origin" in got.refusals[0].reason
    assert [e.seq for e in await n3.events(d.deployment_id)] == [1]
    # The origin's own next events are not displaced by the forged ones.
    await n1.write_deployment(d.deployment_id, events=[("finished", {"status": "failed"})])
    await pull(n1, n3)
    assert [e.event for e in await n3.events(d.deployment_id)] == ["phase", "finished"]


# -- refused: not from the writer ----------------------------------------------------------


def tamper(case, entries, n1, n2_signer):
    """Spoil entry 5 (index 4) of n1's log the way ``case`` says."""
    e = entries[4]
    if case == "bad-signature":
        entries[4] = replace(e, sig=bytes(len(e.sig)))
    elif case == "unknown-key":
        entries[4] = replace(e, key_id="k-nobody")
    elif case == "key-of-another-node":
        entries[4] = replace(e, key_id="k-n2", sig=n2_signer.sign(b"cairn change entry v1\0"
                                                                  + e.body))  # fmt: skip
    elif case == "writer-not-the-logs":
        entries[4] = replace(e, writer="n2")
    elif case == "moved-position":
        nxt = entries[5]
        entries[4] = replace(e, body=nxt.body, sig=nxt.sig)
    elif case == "moved-log":
        entries[4] = forge(
            HmacSigner("n1"), log_id="n1/" + "f" * 32, oseq=5, writer="n1", tbl="members",
            key="n8", data={"name": "n8", "url": "wss://n8", "deleted": False},
            version=(T0 + 10) << 16, sent_as=(n1.log_id, 5, "n1"),
        )  # fmt: skip
    return entries


REASONS = {
    "bad-signature": "bad signature by n1",
    "unknown-key": "unknown key k-nobody",
    "key-of-another-node": "key k-n2 belongs to n2, not n1",
    "writer-not-the-logs": "is written by n1",
    "moved-position": "sits elsewhere than it was sent",
    "moved-log": "sits elsewhere than it was sent",
}


@pytest.mark.parametrize("case", sorted(REASONS))
async def test_a_relayed_entry_not_from_its_writer_is_refused_and_its_log_stops_before_it(
    history, open_store, case
):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await pull(n1, n2)
    await Accounts(n2).put_member("n2", "wss://10.0.0.2:9933", by=None)
    relayed = await n2.read_log(n1.log_id, 0, max_entries=10, max_bytes=1 << 20)
    own = await n2.read_log(n2.log_id, 0, max_entries=10, max_bytes=1 << 20)
    entries = tamper(case, list(relayed.entries), n1, HmacSigner("n2"))
    with n3.feed.subscribe() as sub:
        report = await apply_batch(
            n3, "n2",
            [Range(n1.log_id, 0, 10, False), Range(n2.log_id, 0, own.last, False)],
            [*entries, *own.entries], verifier=KEYRING, direct_log=n2.log_id,
            max_clock_offset_ms=60_000,
        )  # fmt: skip
        notices = sub.drain()
    [refusal] = report.refusals
    assert (refusal.log_id, refusal.oseq, refusal.quarantined) == (n1.log_id, 5, False)
    assert REASONS[case] in refusal.reason
    # The entries before it applied; it and everything after it in its log did not, and
    # nothing of them is stored; the other log of the batch applied.
    assert n3.logs.head(n1.log_id) == 4
    assert [r["oseq"] for r in await changelog_rows(n3, n1.log_id)] == [1, 2, 3, 4]
    assert len(await Accounts(n3).list_members(include_deleted=True)) == 3
    assert await Accounts(n3).get_role("super_user") is None
    assert n3.logs.head(n2.log_id) == 1
    [row] = await quarantine_rows(n3)
    assert (row["peer"], row["oseq"]) == ("n2", 5) and REASONS[case] in row["reason"]
    assert any(n.tbl == "members" and n.key == "n2" for n in notices)
    # The genuine entry still arrives, by another path.
    await pull(n1, n3)
    assert await replicated_rows(n3) == await replicated_rows(n2)


async def test_a_forged_super_user_and_member_removal_attributed_to_another_node_are_refused(
    open_store,
):
    n1, n3 = await open_store("n1"), await open_store("n3")
    await Accounts(n1).put_member("n3", "wss://10.0.0.3:9933", by=None)
    # n2 (a member, with its own valid key) forges n1's next entries.
    mallory = HmacSigner("n2")
    forged = [
        forge(mallory, log_id=n1.log_id, oseq=2, writer="n1", tbl="users", key="root",
              data=user(username="root", role="super_user"), version=(T0 + 5) << 16),
        forge(mallory, log_id=n1.log_id, oseq=3, writer="n1", tbl="members", key="n3",
              data={"name": "n3", "url": "wss://10.0.0.3:9933", "deleted": True},
              version=(T0 + 6) << 16),
    ]  # fmt: skip
    await pull(n1, n3)
    report = await apply_batch(
        n3, "n2", [Range(n1.log_id, 1, 3, False)], forged, verifier=KEYRING,
        direct_log="n2/" + "0" * 32, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert [(r.oseq, r.quarantined) for r in report.refusals] == [(2, False)]
    assert "belongs to n2, not n1" in report.refusals[0].reason
    assert await Accounts(n3).get_user("root") is None
    assert not (await Accounts(n3).get_member("n3")).deleted
    assert n3.logs.head(n1.log_id) == 1


async def test_a_direct_session_needs_no_signature_but_may_not_claim_another_log(open_store):
    n1, n2 = await open_store("n1"), await open_store("n2")
    await Accounts(n1).put_member("n1", "wss://10.0.0.1:9933", by=None)
    chunk = await n1.read_log(n1.log_id, 0, max_entries=10, max_bytes=1 << 20)
    unsigned = [replace(e, sig=b"", key_id="unsigned") for e in chunk.entries]
    # Over n1's own session, n1's entries are n1's: the session proved it.
    report = await apply_batch(
        n2, "n1", [Range(n1.log_id, 0, 1, False)], unsigned, verifier=None,
        direct_log=n1.log_id, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert (report.applied, report.refusals) == (1, [])
    # The same entries from a session of n3 are relayed: without a verifier, refused.
    n4 = await open_store("n4")
    report = await apply_batch(
        n4, "n3", [Range(n1.log_id, 0, 1, False)], unsigned, verifier=None,
        direct_log="n3/" + "0" * 32, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert [r.reason for r in report.refusals] == ["signature: no verifier for a relayed entry"]
    assert n4.logs.head(n1.log_id) == 0


# -- parked: too far ahead -------------------------------------------------------------------


async def test_an_entry_too_far_ahead_is_parked_then_applied_once_the_clock_catches_up(
    open_store, new_wall, create
):
    hour = 3_600_000
    n1 = await open_store("n1", wall=new_wall(T0 + hour))
    w2 = new_wall(T0)
    n2 = await open_store("n2", wall=w2)
    n3 = await open_store("n3", wall=new_wall(T0 + hour))
    d = await create(n1, started_at=T0 + hour)
    await Accounts(n1).put_user("eve", password_hash=phash("e"), role="r", by=None)
    await Accounts(n2).put_member("n2", "wss://10.0.0.2:9933", by=None)

    got = await pull(n1, n2)
    assert (got.parked, got.applied, got.refusals) == (2, 0, [])
    assert n2.logs.head(n1.log_id) == 2
    assert [r["state"] for r in await changelog_rows(n2, n1.log_id)] == [PARKED, PARKED]
    assert await n2.get_deployment(d.deployment_id) is None
    # n2's clock was not dragged an hour ahead.
    mine = await Accounts(n2).put_member("n9", "wss://10.0.0.9:9933", by=None)
    assert version_ms(mine.version) == T0
    assert await retry_parked(n2, max_clock_offset_ms=60_000) == 0
    # Parked entries travel on (a node whose clock agrees applies them) ...
    relayed = await pull(n2, n3)
    assert (relayed.applied, relayed.parked) == (4, 0)
    assert await n3.get_deployment(d.deployment_id) is not None
    # ... and are not trimmed while they wait.
    await trim(n2, [], TrimPolicy())
    assert [r["oseq"] for r in await changelog_rows(n2, n1.log_id)] == [1, 2]

    w2.advance(hour - 30_000)
    with n2.feed.subscribe() as sub:
        assert await retry_parked(n2, max_clock_offset_ms=60_000) == 2
        assert {n.tbl for n in sub.drain()} >= {"deployments", "users"}
    assert [r["state"] for r in await changelog_rows(n2, n1.log_id)] == [APPLIED, APPLIED]
    assert await snapshot(n2) == await snapshot(n3)
    assert await retry_parked(n2, max_clock_offset_ms=60_000) == 0
    await trim(n2, [], TrimPolicy())
    assert await changelog_rows(n2, n1.log_id) == []


async def test_a_parked_entry_does_not_hold_up_the_rest_of_the_batch(open_store, new_wall):
    n1 = await open_store("n1", wall=new_wall(T0 + 3_600_000))
    n2 = await open_store("n2", wall=new_wall(T0))
    n3 = await open_store("n3", wall=new_wall(T0))
    await Accounts(n1).put_user("eve", password_hash=phash("e"), role="r", by=None)
    await Accounts(n2).put_user("frank", password_hash=phash("f"), role="r", by=None)
    await pull(n1, n2, max_clock_offset_ms=10 * 3_600_000)  # n2 tolerates more than n3
    got = await pull(n2, n3)
    assert (got.parked, got.applied, got.batches) == (1, 1, 1)
    assert [u.username for u in await Accounts(n3).list_users()] == ["frank"]


async def test_a_parked_entry_travels_on_in_a_compacted_catch_up(open_store, new_wall):
    hour = 3_600_000
    n1 = await open_store("n1", wall=new_wall(T0 + hour))
    w3 = new_wall(T0)
    n3 = await open_store("n3", wall=w3)
    n4 = await open_store("n4", wall=new_wall(T0 + hour))
    await Accounts(n1).put_user("eve", password_hash=phash("e"), role="r", by=None)
    await Accounts(n1).put_member("n1", "wss://10.0.0.1:9933", by=None)
    await trim(n1, [], TrimPolicy())
    got = await pull(n1, n3)
    assert (got.compacted_ranges, got.parked) == (1, 2)
    # n4 catches up from n3 while n3 still waits for its clock: it gets the entries n3
    # parked (and applies them, its clock agrees), not a position past rows it never saw.
    await pull(n3, n4)
    assert n4.logs.head(n1.log_id) == 2
    assert await snapshot(n4) == await snapshot(n1)
    w3.advance(hour)
    assert await retry_parked(n3, max_clock_offset_ms=60_000) == 2
    assert await snapshot(n3) == await snapshot(n1)


async def test_the_quarantine_keeps_its_newest_reasons(open_store):
    n2 = await open_store("n2")
    log_id = "n1/" + "1" * 32
    forged = [
        forge(HmacSigner("n1"), log_id=log_id, oseq=i, writer="n1", tbl="meta", key=f"k{i}",
              data={}, version=(T0 + i) << 16)
        for i in range(1, 1006)
    ]  # fmt: skip
    report = await apply_batch(
        n2, "n1", [Range(log_id, 0, 1005, False)], forged, verifier=None, direct_log=log_id,
        max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert len(report.refusals) == 1005 and n2.logs.head(log_id) == 1005
    rows = await quarantine_rows(n2)
    assert [r["oseq"] for r in rows] == list(range(6, 1006))


async def test_an_entry_whose_time_has_come_is_retried_behind_many_that_still_wait(
    open_store, new_wall
):
    w2 = new_wall(T0)
    n2 = await open_store("n2", wall=w2)
    far, near = "n1/" + "1" * 32, "n3/" + "3" * 32
    member = {"name": "n9", "url": "wss://n9", "deleted": False}
    waiting = [
        forge(HmacSigner("n1"), log_id=far, oseq=i, writer="n1", tbl="members", key="n9",
              data=member, version=(T0 + 2 * 3_600_000) << 16 | i)
        for i in range(1, 601)
    ]  # fmt: skip
    ready = forge(
        HmacSigner("n3"), log_id=near, oseq=1, writer="n3", tbl="members", key="n8",
        data={**member, "name": "n8"}, version=(T0 + 120_000) << 16,
    )  # fmt: skip
    report = await apply_batch(
        n2, "n1", [Range(far, 0, 600, False), Range(near, 0, 1, False)], [*waiting, ready],
        verifier=KEYRING, direct_log=far, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert report.parked == 601
    w2.advance(120_000)
    assert await retry_parked(n2, max_clock_offset_ms=60_000) == 1
    assert [m.name for m in await Accounts(n2).list_members()] == ["n8"]


async def test_a_relay_cannot_skip_a_receiver_past_entries_of_another_writer(open_store):
    """A relay's compacted range moves the position (absence cannot be proven) but not
    the verified one, so the writer itself is asked again from there."""
    n1, n3 = await open_store("n1"), await open_store("n3")
    await Accounts(n1).put_member("n1", "wss://10.0.0.1:9933", by=None)
    # n2 (a member) claims n1's log up to 1000 holds no current row.
    await apply_batch(
        n3, "n2", [Range(n1.log_id, 0, 1000, True)], [], verifier=KEYRING,
        direct_log="n2/" + "2" * 32, max_clock_offset_ms=60_000,
    )  # fmt: skip
    await pull(n1, n3)
    assert [m.name for m in await Accounts(n3).list_members()] == ["n1"]
