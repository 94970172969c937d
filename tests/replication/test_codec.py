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
    Batch,
    BlobCredit,
    Certs,
    Chunk,
    Credit,
    End,
    Hello,
    LogRange,
    Message,
    Missing,
    Ping,
    Pong,
    Refuse,
    Subscribe,
    Want,
    Welcome,
    WireEntry,
)

H = "0123456789abcdef" * 4
CID = "00112233aabbccdd"
LOG1 = "n1/" + "a" * 32
LOG2 = "n2/" + "b" * 32
MESSAGE_TYPES = typing.get_args(Message)


def entry(oseq: int, **kw: Any) -> WireEntry:
    base: dict[str, Any] = {
        "log_id": LOG1,
        "oseq": oseq,
        "writer": "n1",
        "key_id": "c" * 32,
        "body": b"\x9b\x01" + bytes(range(40)),
        "sig": b"\x30" * 70,
    }
    return WireEntry(**{**base, **kw})


SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, CID, "n2", ("blobs", "snapshot"), LOG2),
    Welcome(PROTOCOL_VERSION, CID, "n1", (), LOG1),
    Refuse("node 'n9' is not a member of this cluster"),
    Subscribe(positions={LOG1: 4, LOG2: 0}, scope="relay", exclude=(LOG2,), credit=4),
    Credit(batches=2, positions={LOG1: 9}),
    Batch(
        ranges=(LogRange(LOG1, 4, 9, False), LogRange(LOG2, 0, 30, True)),
        entries=(entry(5), entry(6), entry(12, log_id=LOG2, writer="n2", key_id="unsigned")),
        lag_entries=3,
        lag_bytes=900,
    ),
    Certs((b"0\x82" + b"d" * 300,)),
    Want(hash=H, offset=1 << 40),
    Chunk(hash=H, offset=65536, data=bytes(range(256)) * 4),
    End(hash=H, size=2**63 - 1),
    Missing(hash=H),
    BlobCredit(chunks=8),
    Ping(t=123),
    Pong(t=0),
]
BATCH = 5


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
    assert wire(Credit(batches=1, positions={})) == {"t": "credit", "batches": 1, "positions": {}}
    batch = wire(Batch((LogRange(LOG1, 0, 1, False),), (entry(1),), 0, 0))
    assert batch["entries"][0][:3] == [LOG1, 1, "n1"]  # entries are arrays
    assert batch["ranges"] == [[LOG1, 0, 1, False]]


def test_decoded_caps_and_entries_are_tuples() -> None:
    hello = decode(encode(SAMPLES[0]))
    assert isinstance(hello, Hello)
    assert hello.caps == ("blobs", "snapshot")
    batch = decode(encode(SAMPLES[BATCH]))
    assert isinstance(batch, Batch)
    assert isinstance(batch.entries, tuple) and isinstance(batch.ranges, tuple)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode(Ping(t=1))
    assert decode(bytearray(frame)) == Ping(t=1)
    assert decode(memoryview(frame)) == Ping(t=1)


def test_encode_refuses_an_oversize_frame() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode(Chunk(hash=H, offset=0, data=b"x" * 2000), FrameLimits(max_frame_bytes=1024))


def test_encode_translates_unencodable_values() -> None:
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(Refuse(reason=object()))  # type: ignore[arg-type]


# -- hostile frames -------------------------------------------------------------------

WRONG_BY_TYPE: dict[type, list[Any]] = {
    int: [True, "1", 1.5, None, -1, 2**64 - 1, b"\x01"],
    str: [1, b"x", None, True, "", ["x"]],
    bytes: ["x", None, 1, [1]],
    list: [{}, "x", None, 1],
}
NULLABLE: set[str] = set()


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
    base = wire(Batch((LogRange(LOG1, 0, 1, False),), (entry(1),), 0, 0))
    for i, value in enumerate(base["entries"][0]):
        for bad in [*_wrong_values(str(i), value), "\x00" * 5000]:
            bad_entry = list(base["entries"][0])
            bad_entry[i] = bad
            cases.append((f"entry-{i}={bad!r:.20}", pack({**base, "entries": [bad_entry]})))
        short = [v for j, v in enumerate(base["entries"][0]) if j != i]
        cases.append((f"entry-missing-{i}", pack({**base, "entries": [short]})))
    for i, value in enumerate(base["ranges"][0]):
        for bad in _wrong_values(str(i), value):
            bad_range = list(base["ranges"][0])
            bad_range[i] = bad
            cases.append((f"range-{i}={bad!r:.20}", pack({**base, "ranges": [bad_range]})))
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


def _batch_frame(**changes: Any) -> bytes:
    base = wire(SAMPLES[BATCH])
    base.update(changes)
    return pack(base)


def _entry_frame(index: int, value: Any) -> bytes:
    base = wire(SAMPLES[BATCH])
    e = list(base["entries"][0])
    e[index] = value
    base["entries"] = [e]
    return pack(base)


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "truncated": encode(SAMPLES[BATCH])[:-3],
    "trailing-bytes": encode(Ping(t=1)) + b"\xc0",
    "two-frames": encode(Ping(t=1)) * 2,
    "not-a-map": pack(["ping", 1]),
    "scalar": pack(7),
    "unknown-type": pack({"t": "exec", "cmd": "rm -rf /"}),
    "old-changes-frame": pack({"t": "changes", "entries": [], "last_seq": 1, "head_seq": 1}),
    "missing-type": pack({"ts": 1}),
    "type-not-str": pack({"t": 1, "ts": 1}),
    "int-map-key": b"\x82\xa1t\xa4ping\x01\x01",
    "bytes-map-key": b"\x82\xa1t\xa4ping\xc4\x02ts\x01",
    "duplicate-key": b"\x83\xa1t\xa4ping\xa2ts\x01\xa2ts\x02",
    "non-utf8": b"\x82\xa1t\xa6refuse\xa6reason\xa2\xff\xfe",
    "surrogate": b"\x82\xa1t\xa6refuse\xa6reason\xa3\xed\xa0\x80",
    "timestamp-ext": pack({"t": "ping", "ts": msgpack.Timestamp(1)}),
    "ext-in-body": _entry_frame(4, msgpack.ExtType(5, b"abc")),
    "uint64-oseq": _entry_frame(1, 2**64 - 1),
    "nan-lag": _batch_frame(lag_bytes=float("nan")),
    "too-deep": _batch_frame(ranges=_deep(40)),
    "deeper-than-msgpack": b"\x91" * 5000 + b"\x01",
    "negative-offset": pack({"t": "want", "hash": H, "offset": -1}),
    "negative-position": pack({"t": "credit", "batches": 1, "positions": {LOG1: -5}}),
    "uint64-offset": pack({"t": "want", "hash": H, "offset": 2**64 - 1}),
    "bool-as-int": pack({"t": "credit", "batches": True, "positions": {}}),
    "float-as-int": pack({"t": "credit", "batches": 1.0, "positions": {}}),
    "hash-uppercase": pack({"t": "missing", "hash": H.upper()}),
    "hash-short": pack({"t": "missing", "hash": H[:-1]}),
    "hash-long": pack({"t": "missing", "hash": H + "0"}),
    "hash-newline": pack({"t": "missing", "hash": H[:-1] + "\n"}),
    "hash-nonhex": pack({"t": "missing", "hash": "g" * 64}),
    "hash-bytes": pack({"t": "missing", "hash": H.encode()}),
    "chunk-data-str": pack({"t": "chunk", "hash": H, "offset": 0, "data": "text"}),
    "writer-not-of-log": _entry_frame(2, "n2"),
    "log-id-short": _entry_frame(0, "n1/abc"),
    "log-id-no-writer": _entry_frame(0, "a" * 32),
    "log-id-path": _entry_frame(0, "../n1/" + "a" * 32),
    "oseq-zero": _entry_frame(1, 0),
    "key-id-bad": _entry_frame(3, "K" * 32),
    "body-empty": _entry_frame(4, b""),
    "body-too-big": _entry_frame(4, b"x" * (256 * 1024 + 1)),
    "sig-too-big": _entry_frame(5, b"x" * 1000),
    "entry-not-array": _batch_frame(entries=[{"log_id": LOG1}]),
    "range-ends-before-start": _batch_frame(ranges=[[LOG1, 9, 4, False]]),
    "range-bad-log": _batch_frame(ranges=[["nope", 0, 1, False]]),
    "position-bad-log": pack({"t": "credit", "batches": 1, "positions": {"x": 1}}),
    "subscribe-bad-scope": pack({**wire(SAMPLES[3]), "scope": "all"}),
    "subscribe-bad-exclude": pack({**wire(SAMPLES[3]), "exclude": ["x"]}),
    "hello-log-of-another-node": pack({**wire(SAMPLES[0]), "log_id": LOG1}),
    "bad-node-name": pack({**wire(SAMPLES[0]), "node": "n 2"}),
    "bad-cluster-id": pack({**wire(SAMPLES[0]), "cluster_id": "XYZ"}),
    "bad-cap": pack({**wire(SAMPLES[0]), "caps": ["Blobs!"]}),
    "too-many-caps": pack({**wire(SAMPLES[0]), "caps": [f"c{i}" for i in range(65)]}),
    "huge-reason": pack({"t": "refuse", "reason": "x" * 5000}),
    "huge-cert": pack({"t": "certs", "certs": [b"x" * 20_000]}),
    "cert-not-bytes": pack({"t": "certs", "certs": ["pem"]}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_raise_protocol_error(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode(HOSTILE[name])


def test_msgpack_errors_are_chained() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(HOSTILE["trailing-bytes"])
    assert isinstance(info.value.__cause__.__cause__, msgpack.ExtraData)


def test_limits_are_enforced() -> None:
    chunk = encode(Chunk(hash=H, offset=0, data=b"x" * 4096))
    with pytest.raises(ProtocolError, match="exceed the limit"):
        decode(chunk, FrameLimits(max_frame_bytes=4096))
    assert decode(chunk, FrameLimits(max_frame_bytes=len(chunk))).TYPE == "chunk"

    nested = pack({"t": "refuse", "reason": "x", "extra": _deep(5)})
    with pytest.raises(ProtocolError, match="deeper than 5"):
        decode(nested, FrameLimits(max_depth=5))
    with pytest.raises(ProtocolError, match="unknown field"):  # depth fine, field not
        decode(nested, FrameLimits(max_depth=8))

    many = pack({"t": "certs", "certs": [b"x"] * 15, "x": [b"y"] * 15})  # 33 items in all
    with pytest.raises(ProtocolError, match="more than 20 items"):
        decode(many, FrameLimits(max_items=20))
    few = pack({"t": "certs", "certs": [b"x"] * 30})  # 31 items
    assert decode(few, FrameLimits(max_items=40)).TYPE == "certs"
    with pytest.raises(ProtocolError, match="max_array_len"):  # one container alone
        decode(pack({"t": "certs", "certs": [b"x"] * 50}), FrameLimits(max_items=40))


def test_default_limits() -> None:
    assert FrameLimits(16 * 1024 * 1024, 32, 100_000) == DEFAULT_LIMITS
    with pytest.raises(ProtocolError):
        decode(b"\xc4" + b"\x00" * (16 * 1024 * 1024))


def test_non_bytes_input() -> None:
    with pytest.raises(ProtocolError, match="expected bytes"):
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
            e = list(rng.choice(bases[BATCH]["entries"]))
            e[rng.randrange(len(e))] = _random_value(rng)
            frame["entries"] = [e]
        _decode_or_protocol_error(pack(frame))


def test_message_classes_are_frozen_and_slotted() -> None:
    for cls in (*MESSAGE_TYPES, WireEntry, LogRange):
        assert dataclasses.is_dataclass(cls)
        assert "__slots__" in vars(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Ping(t=1).t = 2  # type: ignore[misc]
