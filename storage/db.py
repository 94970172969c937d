"""The SQLite database: open, pragmas, numbered migrations, one writer, a pool of readers.

WAL mode with ``synchronous=FULL``: a committed transaction survives power loss, and
readers never block the writer. All writes go through :meth:`Database.write`, which
serialises them on one connection with an asyncio lock and keeps each transaction short.

Reads run on a small pool of threads, each with its own connection. A read is one call
into its thread that executes, fetches every row and closes the cursor before it
returns, so no statement is ever left open on a reader: a read transaction always ends,
even when the awaiting task is cancelled (the thread finishes the read regardless), and
the next read on that connection sees every commit made before it started. Reads do not
queue behind each other up to the pool's size.

:data:`INLINE` is a seam for the deterministic simulator (``tests/sim``): a database
opened while it is set runs every call at once on the calling thread, with no worker
thread and no reader pool, so calls complete in program order (threads hand results
back in an order no seed can fix). Production never sets it.

sqlite3 errors are translated to :class:`~storage.errors.StorageError` here.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from storage.errors import SchemaError, StorageError

__all__ = ["INLINE", "Database", "migrations"]

#: Set (to True) around :meth:`Database.open` to run that database's calls inline, on the
#: calling thread (the deterministic simulator); read once, when the database opens.
INLINE: ContextVar[bool] = ContextVar("cairn_db_inline", default=False)

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


def migrations() -> list[tuple[int, str, str]]:
    """The shipped migrations as ``(number, name, sql)``, in order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("storage.migrations").iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        number = int(name.split("_", 1)[0])
        found.append((number, name, entry.read_text(encoding="utf-8")))
    found.sort()
    for expected, (number, name, _) in enumerate(found, start=1):
        if number != expected:
            raise SchemaError(f"migration {name} is out of sequence (expected {expected:04d})")
    return found


class _InlineConnection(aiosqlite.Connection):
    """aiosqlite's API with every call run at once on the calling thread (no worker
    thread): what :data:`INLINE` selects. Everything aiosqlite does funnels through
    ``_execute``, the connect and ``stop``, so those three are all it replaces."""

    def __init__(self, path: Path) -> None:
        super().__init__(lambda: sqlite3.connect(path, isolation_level=None), 64)

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> _InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Any:
        return self._connect().__await__()

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def _connect(path: Path, *, inline: bool = False) -> aiosqlite.Connection:
    if inline:
        conn: aiosqlite.Connection = await _InlineConnection(path)
    else:
        conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
    except BaseException:
        await conn.close()  # its worker thread would otherwise keep the process alive
        raise
    return conn


class _Readers:
    """Reader connections, made when the database opens, each used by one thread at a
    time: a read takes a free connection, runs start to finish in a worker thread, and
    gives the connection back only when that thread is done with it (also when the
    awaiting task was cancelled meanwhile)."""

    def __init__(self, path: Path, size: int, *, inline: bool = False) -> None:
        self._inline = inline
        self._conns = [self._connect(path) for _ in range(1 if inline else size)]
        self._free: asyncio.Queue[sqlite3.Connection] = asyncio.Queue()
        for conn in self._conns:
            self._free.put_nowait(conn)
        self._pool = None if inline else ThreadPoolExecutor(size, thread_name_prefix="cairn-read")

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA query_only=ON")
        return conn

    @staticmethod
    def _read(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        cur = conn.execute(sql, params)
        try:
            return cur.fetchall()
        finally:
            cur.close()

    async def read(self, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        if self._inline:  # one connection, given back before anything else can run
            return self._read(self._conns[0], sql, params)
        conn = await self._free.get()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._read, conn, sql, params)

        def done(f: asyncio.Future[list[sqlite3.Row]]) -> None:
            self._free.put_nowait(conn)
            if not f.cancelled():
                f.exception()  # seen here too: a caller cancelled meanwhile never sees it

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for conn in self._conns:
            conn.close()


class Database:
    """One writer connection (behind a lock) and a pool of reader connections.

    Args:
        readers: how many reads may run at once.
        inline: run every call on the calling thread (see :data:`INLINE`).
    """

    def __init__(
        self, path: Path, writer: aiosqlite.Connection, *, readers: int = 4, inline: bool = False
    ) -> None:
        self.path = path
        self._writer = writer
        self._inline = inline
        self._readers = _Readers(path, readers, inline=inline)
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, upto: int | None = None) -> Database:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        Args:
            path: the SQLite file; its directory is created if needed.
            upto: apply migrations only up to this number (tests build old schemas).

        Raises:
            SchemaError: the file was written by a newer cairn, or a migration failed.
            StorageError: the file cannot be opened as SQLite.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        inline = INLINE.get()
        try:
            writer = await _connect(path, inline=inline)
            try:
                await _migrate(writer, upto)
            except BaseException:
                await writer.close()
                raise
        except sqlite3.Error as e:
            raise StorageError(f"cannot open database {path}: {e}") from e
        return cls(path, writer, inline=inline)

    async def close(self) -> None:
        """Close every connection (the WAL is checkpointed by SQLite)."""
        async with self._lock:
            if self._inline:
                self._readers.close()
            else:
                await asyncio.to_thread(self._readers.close)
            await self._writer.close()

    async def schema_version(self) -> int:
        """The ``user_version`` of the open database."""
        row = await self.fetchone("PRAGMA user_version")
        return int(row[0]) if row else 0

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A short write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) on the writer.

        Raises:
            StorageError: any sqlite3 error inside the transaction (it is rolled back).
        """
        async with self._lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StorageError(f"cannot begin a write: {e}") from e
            try:
                yield self._writer
            except BaseException as e:
                # Shielded so a cancelled caller cannot leave the transaction open.
                await asyncio.shield(self._writer.execute("ROLLBACK"))
                if isinstance(e, sqlite3.Error):
                    raise StorageError(str(e)) from e
                raise
            else:
                try:
                    await asyncio.shield(self._writer.execute("COMMIT"))
                except sqlite3.Error as e:
                    if self._writer.in_transaction:
                        await asyncio.shield(self._writer.execute("ROLLBACK"))
                    raise StorageError(str(e)) from e

    async def fetchall(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Run a read-only query on a reader connection (a short read that always ends)."""
        try:
            return await self._readers.read(sql, params)
        except sqlite3.Error as e:
            raise StorageError(str(e)) from e

    async def fetchone(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row | None:
        """Run a read-only query and return its first row, if any."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


async def _migrate(conn: aiosqlite.Connection, upto: int | None) -> None:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    shipped = migrations()
    if current > len(shipped):
        raise SchemaError(
            f"the database has schema {current}, newer than this cairn knows ({len(shipped)})"
        )
    for number, name, sql in shipped:
        if number <= current or (upto is not None and number > upto):
            continue
        try:
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version={number};\nCOMMIT;"
            )
        except sqlite3.Error as e:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise SchemaError(f"migration {name} failed: {e}") from e
