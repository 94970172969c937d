"""The frame codec: round trips, and hostile input that must only ever raise ProtocolError."""

from __future__ import annotations

import dataclasses
import random
import typing
from typing import Any

import msgpack
import pytest

from replication.codec import DEFAULT_LIMITS, FrameLimits, decode, encode
from replication.errors import ProtocolError
from replication.messages import (
    PROTOCOL_VERSION,
    BlobCredit,
    ChangeEntry,
    Changes,
    Chunk,
    Credit,
    End,
    Hello,
    Message,
    Missing,
    Ping,
    Pong,
    Refuse,
    Subscribe,
    Want,
    Welcome,
)

H = "0123456789abcdef" * 4
CID = "00112233aabbccdd"
MESSAGE_TYPES = typing.get_args(Message)


def entry(seq: int, **kw: Any) -> ChangeEntry:
    base: dict[str, Any] = {
        "seq": seq,
        "tbl": "deployments",
        "key": "8d0c1f8e-6e1b-4d0a-9a57-0d6c2f4b9e11",
        "version": (1_700_000_000_000 << 16) | 3,
        "origin": "n1",
        "op": "upsert",
        "data": {"status": "success", "n": [1, 2.5, None, True], "blob": b"\x00\xff", "é": "ü"},
        "user": "admin",
        "t": 1_700_000_000_000,
    }
    return ChangeEntry(**{**base, **kw})


SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, CID, "n2", ("blobs", "snapshot")),
    Welcome(PROTOCOL_VERSION, CID, "n1", ()),
    Refuse("node 'n9' is not a member of this cluster"),
    Subscribe(after_seq=0, credit=4),
    Credit(batches=2),
    Changes(
        entries=(
            entry(5),
            entry(7, op="delete", data=None, user=None),
            entry(9, data=[{"a": {"b": []}}]),
        ),
        last_seq=10,
        head_seq=12,
    ),
    Changes(entries=(), last_seq=3, head_seq=3),
    Want(hash=H, offset=1 << 40),
    Chunk(hash=H, offset=65536, data=bytes(range(256)) * 4),
    End(hash=H, size=2**63 - 1),
    Missing(hash=H),
    BlobCredit(chunks=8),
    Ping(t=123),
    Pong(t=0),
]


def wire(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return out


def pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


# -- round trips ----------------------------------------------------------------------


def test_every_frame_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)
    assert len({cls.TYPE for cls in MESSAGE_TYPES}) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg
    assert wire(msg)["t"] == msg.TYPE


def test_frames_are_tagged_maps_with_time_as_ts() -> None:
    assert wire(Ping(t=5)) == {"t": "ping", "ts": 5}
    assert wire(Credit(batches=1)) == {"t": "credit", "batches": 1}
    changes = wire(Changes(entries=(entry(1),), last_seq=1, head_seq=1))
    assert changes["entries"][0]["t"] == 1_700_000_000_000  # entries are untagged


def test_decoded_caps_and_entries_are_tuples() -> None:
    hello = decode(encode(SAMPLES[0]))
    assert isinstance(hello, Hello)
    assert hello.caps == ("blobs", "snapshot")
    changes = decode(encode(SAMPLES[5]))
    assert isinstance(changes, Changes)
    assert isinstance(changes.entries, tuple)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode(Ping(t=1))
    assert decode(bytearray(frame)) == Ping(t=1)
    assert decode(memoryview(frame)) == Ping(t=1)


def test_encode_refuses_an_oversize_frame() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode(Chunk(hash=H, offset=0, data=b"x" * 2000), FrameLimits(max_frame_bytes=1024))


def test_encode_translates_unencodable_values() -> None:
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(Changes(entries=(entry(1, data={"x": object()}),), last_seq=1, head_seq=1))


# -- hostile frames -------------------------------------------------------------------

WRONG_BY_TYPE: dict[type, list[Any]] = {
    int: [True, "1", 1.5, None, -1, 2**64 - 1, b"\x01"],
    str: [1, b"x", None, True, "", ["x"]],
    bytes: ["x", None, 1, [1]],
    list: [{}, "x", None, 1],
}
NULLABLE = {"data", "user"}


def _wrong_values(name: str, value: Any) -> list[Any]:
    wrong = WRONG_BY_TYPE.get(type(value), [b"x", 1])
    if name in NULLABLE:
        wrong = [w for w in wrong if w is not None and not isinstance(w, list | dict)]
    return wrong


def _field_cases() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for msg in SAMPLES:
        base = wire(msg)
        for name, value in base.items():
            if name == "t":
                continue
            cases.append(
                (f"{msg.TYPE}-missing-{name}", pack({k: v for k, v in base.items() if k != name}))
            )
            for bad in _wrong_values(name, value):
                cases.append((f"{msg.TYPE}-{name}={bad!r}", pack({**base, name: bad})))
        cases.append((f"{msg.TYPE}-extra", pack({**base, "extra": 1})))
    base = wire(Changes(entries=(entry(1),), last_seq=1, head_seq=1))
    for name, value in base["entries"][0].items():
        for bad in [*_wrong_values(name, value), "\x00" * 5000]:
            bad_entry = {**base["entries"][0], name: bad}
            cases.append((f"entry-{name}={bad!r:.20}", pack({**base, "entries": [bad_entry]})))
        short = {k: v for k, v in base["entries"][0].items() if k != name}
        cases.append((f"entry-missing-{name}", pack({**base, "entries": [short]})))
    return cases


@pytest.mark.parametrize(("label", "frame"), _field_cases(), ids=lambda v: str(v)[:60])
def test_every_field_is_validated(label: str, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def _deep(levels: int) -> Any:
    data: Any = 1
    for _ in range(levels):
        data = [data]
    return data


def _changes_frame(**entry_fields: Any) -> bytes:
    base = wire(Changes(entries=(entry(1),), last_seq=1, head_seq=1))
    base["entries"][0].update(entry_fields)
    return pack(base)


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "truncated": encode(SAMPLES[5])[:-3],
    "trailing-bytes": encode(Ping(t=1)) + b"\xc0",
    "two-frames": encode(Ping(t=1)) * 2,
    "not-a-map": pack(["ping", 1]),
    "scalar": pack(7),
    "unknown-type": pack({"t": "exec", "cmd": "rm -rf /"}),
    "missing-type": pack({"ts": 1}),
    "type-not-str": pack({"t": 1, "ts": 1}),
    "int-map-key": b"\x82\xa1t\xa4ping\x01\x01",
    "bytes-map-key": b"\x82\xa1t\xa4ping\xc4\x02ts\x01",
    "duplicate-key": b"\x83\xa1t\xa4ping\xa2ts\x01\xa2ts\x02",
    "non-utf8": b"\x82\xa1t\xa6refuse\xa6reason\xa2\xff\xfe",
    "surrogate": b"\x82\xa1t\xa6refuse\xa6reason\xa3\xed\xa0\x80",
    "timestamp-ext": pack({"t": "ping", "ts": msgpack.Timestamp(1)}),
    "ext-in-data": _changes_frame(data={"x": msgpack.ExtType(5, b"abc")}),
    "uint64-in-data": _changes_frame(data={"x": 2**64 - 1}),
    "nan-in-data": _changes_frame(data={"x": float("nan")}),
    "inf-in-data": _changes_frame(data=[float("-inf")]),
    "too-deep": _changes_frame(data=_deep(40)),
    "deeper-than-msgpack": b"\x91" * 5000 + b"\x01",
    "negative-offset": pack({"t": "want", "hash": H, "offset": -1}),
    "negative-seq": pack({"t": "subscribe", "after_seq": -5, "credit": 1}),
    "uint64-offset": pack({"t": "want", "hash": H, "offset": 2**64 - 1}),
    "bool-as-int": pack({"t": "credit", "batches": True}),
    "float-as-int": pack({"t": "credit", "batches": 1.0}),
    "hash-uppercase": pack({"t": "missing", "hash": H.upper()}),
    "hash-short": pack({"t": "missing", "hash": H[:-1]}),
    "hash-long": pack({"t": "missing", "hash": H + "0"}),
    "hash-newline": pack({"t": "missing", "hash": H[:-1] + "\n"}),
    "hash-nonhex": pack({"t": "missing", "hash": "g" * 64}),
    "hash-bytes": pack({"t": "missing", "hash": H.encode()}),
    "chunk-data-str": pack({"t": "chunk", "hash": H, "offset": 0, "data": "text"}),
    "bad-op": _changes_frame(op="drop_table"),
    "bad-origin": _changes_frame(origin="../n1"),
    "bad-table": _changes_frame(tbl="users; DROP"),
    "data-scalar": _changes_frame(data=5),
    "entry-not-map": pack({"t": "changes", "entries": [[1, 2]], "last_seq": 1, "head_seq": 1}),
    "entries-out-of-order": pack(
        {**wire(SAMPLES[5]), "entries": list(reversed(wire(SAMPLES[5])["entries"]))}
    ),
    "duplicate-seq": pack({**wire(SAMPLES[5]), "entries": [wire(SAMPLES[5])["entries"][0]] * 2}),
    "last-before-entries": pack({**wire(SAMPLES[5]), "last_seq": 8, "head_seq": 12}),
    "head-before-last": pack({**wire(SAMPLES[5]), "head_seq": 9}),
    "bad-node-name": pack({**wire(SAMPLES[0]), "node": "n 2"}),
    "bad-cluster-id": pack({**wire(SAMPLES[0]), "cluster_id": "XYZ"}),
    "bad-cap": pack({**wire(SAMPLES[0]), "caps": ["Blobs!"]}),
    "too-many-caps": pack({**wire(SAMPLES[0]), "caps": [f"c{i}" for i in range(65)]}),
    "huge-reason": pack({"t": "refuse", "reason": "x" * 5000}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_raise_protocol_error(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode(HOSTILE[name])


def test_msgpack_errors_are_chained() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(HOSTILE["trailing-bytes"])
    assert isinstance(info.value.__cause__, msgpack.ExtraData)


def test_limits_are_enforced() -> None:
    chunk = encode(Chunk(hash=H, offset=0, data=b"x" * 4096))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(chunk, FrameLimits(max_frame_bytes=4096))
    assert decode(chunk, FrameLimits(max_frame_bytes=len(chunk))).TYPE == "chunk"

    nested = _changes_frame(data=_deep(5))
    assert decode(nested, FrameLimits(max_depth=8)).TYPE == "changes"
    with pytest.raises(ProtocolError, match="deeper than 7"):
        decode(nested, FrameLimits(max_depth=7))

    many = _changes_frame(data=[list(range(25)), list(range(25))])  # 68 items in all
    with pytest.raises(ProtocolError, match="more than 40 items"):
        decode(many, FrameLimits(max_items=40))
    assert decode(many, FrameLimits(max_items=68)).TYPE == "changes"
    with pytest.raises(ProtocolError, match="max_array_len"):  # one container alone
        decode(_changes_frame(data=list(range(50))), FrameLimits(max_items=40))


def test_default_limits() -> None:
    assert FrameLimits(16 * 1024 * 1024, 32, 100_000) == DEFAULT_LIMITS
    with pytest.raises(ProtocolError):
        decode(b"\xc4" + b"\x00" * (16 * 1024 * 1024))


def test_non_bytes_input() -> None:
    with pytest.raises(ProtocolError, match="must be bytes"):
        decode("ping")  # type: ignore[arg-type]


# -- fuzzing (stdlib random, seeded: hypothesis is not installed) ---------------------


def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)
    assert decode(encode(msg)) == msg  # whatever is accepted is a well-formed message


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] = rng.randrange(256)
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif op == 2 and b:
            del b[i % len(b)]
        elif op == 3:
            b = b[:i]
        else:
            b[i:i] = b[rng.randrange(len(b) + 1) :][: rng.randint(1, 16)]
    return bytes(b)


def test_fuzz_random_bytes() -> None:
    rng = random.Random(1)
    for _ in range(5000):
        _decode_or_protocol_error(rng.randbytes(rng.randint(0, 64)))


def test_fuzz_mutated_valid_frames() -> None:
    rng = random.Random(2)
    frames = [encode(m) for m in SAMPLES]
    for _ in range(20_000):
        _decode_or_protocol_error(_mutate(rng, rng.choice(frames)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 4 else 7)
    leaves: list[Any] = [
        None,
        rng.choice([True, False]),
        rng.choice([0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), rng.randrange(-9, 9)]),
        rng.choice([0.5, float("nan"), float("inf"), -0.0]),
        rng.choice(["", "n1", H, CID, "upsert", "delete", "blobs", "é", "\x00"]),
        rng.randbytes(rng.randint(0, 8)),
        msgpack.ExtType(rng.randrange(128), b"x"),
    ]
    if kind < 7:
        return leaves[kind]
    if kind < 9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "data", "ts"]): _random_value(rng, depth + 1)}


def test_fuzz_structured_field_replacement() -> None:
    rng = random.Random(3)
    bases = [wire(m) for m in SAMPLES]
    for _ in range(10_000):
        frame = dict(rng.choice(bases))
        names = [*frame, "extra"]
        for _ in range(rng.randint(1, 3)):
            frame[rng.choice(names)] = _random_value(rng)
        if "entries" in frame and isinstance(frame["entries"], list) and frame["entries"]:
            e = dict(rng.choice(bases[5]["entries"]))
            e[rng.choice([*e])] = _random_value(rng)
            frame["entries"] = [e]
        _decode_or_protocol_error(pack(frame))


def test_message_classes_are_frozen_and_slotted() -> None:
    for cls in (*MESSAGE_TYPES, ChangeEntry):
        assert dataclasses.is_dataclass(cls)
        assert "__slots__" in vars(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(t=1).t = 2  # type: ignore[misc]
