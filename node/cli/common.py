"""What every ``cairn`` client command shares: connection options, output, exit codes.

Every client command takes ``--target``, ``--user`` and ``--password`` (or ``CAIRN_TARGET``,
``CAIRN_USER``, ``CAIRN_PASSWORD``). Exit codes: 0 success; 1 a failed deploy or an error
answer from the node; 2 usage errors, refused credentials and unreachable targets.
Failures are one line on stderr, never a traceback. With ``--json`` stdout carries only
the JSON result; human output then goes to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

if TYPE_CHECKING:  # the client imports aiohttp: loaded when a command runs, not at start
    from node.cli.api.client import Client

__all__ = [
    "Conn",
    "connection_options",
    "connection_options_auth_user",
    "fail",
    "human_stream",
    "parse_time",
    "print_json",
    "run",
    "time_option",
]


def fail(message: str, code: int) -> NoReturn:
    """Print ``cairn: message`` on stderr and exit with ``code``."""
    click.echo(f"cairn: {message}", err=True)
    sys.exit(code)


# -- connection options -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conn:
    """Where and as whom a command talks to a node."""

    target: str
    user: str | None
    password: str | None
    ca: Path | None

    def client(self) -> Client:
        from node.cli.api.client import Client

        return Client(self.target, user=self.user, password=self.password, ca_file=self.ca)


def _connection(*user_flags: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator adding ``--target``, the user flags, ``--password`` and ``--ca``; the
    command receives them as ``conn``."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(
            target: str, auth_user: str | None, password: str | None, ca: Path | None,
            **kwargs: Any,
        ) -> None:  # fmt: skip
            if not re.match(r"^https?://[^/\s]+", target):
                raise click.BadParameter(
                    f"{target!r} is not an http(s) URL", param_hint="'--target' / CAIRN_TARGET"
                )
            if auth_user is not None and password is None:
                if not sys.stdin.isatty():
                    raise click.UsageError("no password: pass --password or set CAIRN_PASSWORD")
                password = click.prompt(f"Password for {auth_user}", hide_input=True, err=True)
            command(conn=Conn(target, auth_user, password, ca), **kwargs)

        options = [
            click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         envvar="CAIRN_CA", help="CA bundle for an https target [env CAIRN_CA]"),
            click.option("--password", envvar="CAIRN_PASSWORD",
                         help="password [env CAIRN_PASSWORD; prompted on a terminal]"),
            click.option(*user_flags, "auth_user", envvar="CAIRN_USER",
                         help="user to sign in as [env CAIRN_USER]"),
            click.option("--target", "-t", envvar="CAIRN_TARGET", default="http://127.0.0.1:9925",
                         show_default=True, help="admin URL of a node [env CAIRN_TARGET]"),
        ]  # fmt: skip
        for option in options:
            wrapper = option(wrapper)
        return wrapper

    return decorate


#: ``--target/--user/--password/--ca`` (``--auth-user`` is an alias of ``--user``).
connection_options = _connection("--user", "-u", "--auth-user")
#: The same for commands where ``--user`` is a filter: sign in with ``--auth-user``.
connection_options_auth_user = _connection("--auth-user")


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> NoReturn:
    """Run a command's coroutine; turn client errors into one line and an exit code."""
    from node.cli.api.errors import ApiError, AuthError, ConnectError, StreamError

    try:
        code = asyncio.run(main())
    except AuthError as e:
        fail(f"{e.describe()}: check --user/--password (or CAIRN_USER/CAIRN_PASSWORD)", 2)
    except ApiError as e:
        fail(e.describe(), 2 if e.status == 400 else 1)
    except ConnectError as e:
        fail(str(e), 2)
    except StreamError as e:
        fail(str(e), 2)
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(code)


def human_stream(as_json: bool) -> TextIO:
    """Where human-readable lines go: stderr when stdout is reserved for JSON."""
    return sys.stderr if as_json else sys.stdout


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def parse_time(value: str) -> int:
    """Epoch ms, ``15m``/``2h``/``3d`` ago, or an ISO date/time (local unless zoned)."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - seconds) * 1000)
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use epoch milliseconds, an age like 15m/2h/3d, or an ISO date"
        ) from None


def time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_time(value)
