#!/usr/bin/env python3
"""``cairn node run`` with every peer frame counted at the transport (benchmarks only).

Runs the normal command line (``python bench/wirenode.py node run --config X``) after
replacing the TLS transport :mod:`node.cluster` builds with a subclass whose channels
count what they send: frames and bytes by message type, the bytes being the encoded
frame exactly as it goes to the WebSocket (the channel encodes once, as it always does,
and hands the frame to ``send_raw``). Every frame on a link is sent by one of its two
ends, so the sum over all nodes is what crossed the wire.

On SIGUSR2 the node writes its counters as JSON to ``$CAIRN_BENCH_WIRE_FILE`` (via a
rename, so a reader never sees half a file)::

    {"frames": {"batch": 12, "chunk": 80, ...}, "bytes": {...}, "entries": 40,
     "entries_by_log": {...}}

``entries`` counts change entries inside sent batches (a change that crossed a link
twice would show here as more entries than distinct changes).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import node.cluster
from replication.channel import Accept, Channel, TlsTransport, WebSocketChannel
from replication.codec import encode
from replication.messages import Batch, Message

FRAMES: Counter[str] = Counter()
BYTES: Counter[str] = Counter()
ENTRIES: Counter[str] = Counter()


class CountingChannel:
    """A channel that counts each frame it sends, by type."""

    def __init__(self, inner: Channel) -> None:
        assert isinstance(inner, WebSocketChannel)
        self._inner = inner

    @property
    def peer(self) -> str:
        return self._inner.peer

    @property
    def remote(self) -> str:
        return self._inner.remote

    async def send(self, msg: Message) -> None:
        frame = encode(msg, self._inner._limits)
        FRAMES[msg.TYPE] += 1
        BYTES[msg.TYPE] += len(frame)
        if isinstance(msg, Batch):
            for e in msg.entries:
                ENTRIES[e.log_id.split("/")[0]] += 1
        await self._inner.send_raw(frame)

    async def receive(self) -> Message:
        return await self._inner.receive()

    async def close(self, reason: str = "", *, protocol_error: bool = False) -> None:
        await self._inner.close(reason, protocol_error=protocol_error)


class CountingTlsTransport(TlsTransport):
    async def start(self, accept: Accept) -> None:
        async def counted(channel: Channel) -> None:
            await accept(CountingChannel(channel))

        await super().start(counted)

    async def dial(self, peer: str, url: str) -> Channel:
        return CountingChannel(await super().dial(peer, url))


def _dump(_sig: int, _frame: Any) -> None:
    path = Path(os.environ["CAIRN_BENCH_WIRE_FILE"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "frames": dict(FRAMES),
                "bytes": dict(BYTES),
                "entries": sum(ENTRIES.values()),
                "entries_by_writer": dict(ENTRIES),
            }
        )
    )
    tmp.rename(path)


def main() -> None:
    node.cluster.TlsTransport = CountingTlsTransport  # type: ignore[misc]
    signal.signal(signal.SIGUSR2, _dump)
    from node.cli.root import main as cli

    sys.argv[0] = "cairn"
    cli()


if __name__ == "__main__":
    main()
