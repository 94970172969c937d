"""What every ``cairn`` client command shares: connection options, output, exit codes.

Every client command takes ``--target``, ``--user`` and ``--password`` (or
``CAIRN_TARGET``, ``CAIRN_USER``, ``CAIRN_PASSWORD``); ``--user``/``--password`` always
mean "sign in as". Every command takes ``--json``: stdout then carries exactly one JSON
document (the result, or on failure the error body), and human lines go to stderr.

Exit codes (:data:`EXIT_OK`, :data:`EXIT_FAILED`, :data:`EXIT_USAGE`): 0 success; 1 the
operation failed (a failed deploy, or the node refused: 403, 404, 409, 410, 5xx; a stream
that broke off); 2 a usage or input error (bad flags or values, an ambiguous id prefix,
input the node answered 400, refused credentials, a target that cannot be reached). A
failure is one ``cairn: ...`` line on stderr saying what to do next, never a traceback:
foreign errors are put into words once, by :mod:`node.cli.api.client`, and here.
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
    from node.cli.api.errors import ApiError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Conn",
    "connection_options",
    "fail",
    "human_stream",
    "json_option",
    "parse_time",
    "print_json",
    "run",
    "time_option",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A command cannot go on; :func:`run` prints the message and exits with ``exit_code``.

    Attributes:
        exit_code: :data:`EXIT_FAILED` or :data:`EXIT_USAGE`.
        body: the JSON error document printed on stdout under ``--json``.
    """

    def __init__(
        self, message: str, *, exit_code: int = EXIT_FAILED, code: str = "failed", **extra: Any
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.body: dict[str, Any] = {"error": message, "code": code, **extra}


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


def check_target(target: str) -> str:
    """``target`` if it is an http(s) URL.

    Raises:
        click.BadParameter: it is not.
    """
    if not re.match(r"^https?://[^/\s]+", target):
        raise click.BadParameter(
            f"{target!r} is not an http(s) URL (like http://127.0.0.1:9925)",
            param_hint="'--target' / CAIRN_TARGET",
        )
    return target


def ask_password(user: str | None, password: str | None) -> str | None:
    """The password for ``user``: given, or prompted for on a terminal.

    Raises:
        click.UsageError: a user without a password, and no terminal to ask on.
    """
    if user is None or password is not None:
        return password
    if not sys.stdin.isatty():
        raise click.UsageError(f"no password for {user}: pass --password or set CAIRN_PASSWORD")
    value: str = click.prompt(f"Password for {user}", hide_input=True, err=True)
    return value


def connection_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add ``--target``, ``--user``, ``--password`` and ``--ca``; the command gets ``conn``.

    ``--auth-user`` is kept as a hidden alias of ``--user`` (it was the sign-in flag of
    ``deployments list`` while ``--user`` filtered there; the filter is now
    ``--deployed-by``).
    """

    @functools.wraps(command)
    def wrapper(
        target: str, auth_user: str | None, auth_user_alias: str | None, password: str | None,
        ca: Path | None, **kwargs: Any,
    ) -> None:  # fmt: skip
        user = auth_user_alias if auth_user_alias is not None else auth_user
        password = ask_password(user, password)
        command(conn=Conn(check_target(target), user, password, ca), **kwargs)

    options = [
        click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     envvar="CAIRN_CA", help="CA bundle for an https target [env CAIRN_CA]"),
        click.option("--password", envvar="CAIRN_PASSWORD",
                     help="password to sign in with [env CAIRN_PASSWORD; prompted on a terminal]"),
        click.option("--auth-user", "auth_user_alias", hidden=True),
        click.option("--user", "-u", "auth_user", envvar="CAIRN_USER",
                     help="user to sign in as [env CAIRN_USER]"),
        click.option("--target", "-t", envvar="CAIRN_TARGET", default="http://127.0.0.1:9925",
                     show_default=True, help="admin URL of a node [env CAIRN_TARGET]"),
    ]  # fmt: skip
    for option in options:
        wrapper = option(wrapper)
    return wrapper


def json_option(command: Callable[..., None]) -> Callable[..., None]:
    """``--json``: one JSON document on stdout; the command gets ``as_json``."""
    return click.option(
        "--json", "as_json", is_flag=True,
        help="print one JSON document on stdout (the result, or the error); text goes to stderr",
    )(command)  # fmt: skip


# -- running a command --------------------------------------------------------------------


def _api_failure(e: ApiError) -> tuple[str, int]:
    """The line and exit code for an error answer, with what to do next."""
    what = e.describe()
    if e.status == 401:
        return f"{what}: check --user/--password (or CAIRN_USER/CAIRN_PASSWORD)", EXIT_USAGE
    if e.status == 403:
        op = f" '{e.operation}'" if e.operation else ""
        return f"{what}: ask an administrator for a role that allows{op}", EXIT_FAILED
    if e.code == "unknown_operation":
        return (
            f"{what}: the node runs a cairn version without this operation; upgrade it",
            EXIT_FAILED,
        )
    return what, EXIT_USAGE if e.status == 400 else EXIT_FAILED


def os_error_line(e: OSError) -> str:
    """A local file error in plain words: ``cannot open FILE: permission denied``."""
    from node.cli.api.errors import describe_os_error

    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{describe_os_error(e)}"


def run(main: Callable[[], Coroutine[Any, Any, int]], *, as_json: bool = False) -> NoReturn:
    """Run a command's coroutine; turn every failure into one line and an exit code.

    Under ``as_json`` the failure is also printed on stdout as a JSON error document
    (``{"error", "code", ...}``), so stdout always holds exactly one document.
    """
    from node.cli.api.errors import ApiError, ConnectError, StreamError

    def failed(message: str, code: int, body: dict[str, Any]) -> NoReturn:
        if as_json:
            print_json(body)
        fail(message, code)

    try:
        code = asyncio.run(main())
    except CommandError as e:
        failed(str(e), e.exit_code, e.body)
    except ApiError as e:
        message, code = _api_failure(e)
        failed(message, code, {**e.body, "status": e.status})
    except ConnectError as e:
        failed(str(e), EXIT_USAGE, {"error": str(e), "code": "unreachable"})
    except StreamError as e:
        failed(str(e), EXIT_FAILED, {"error": str(e), "code": "stream_broken"})
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except OSError as e:
        line = os_error_line(e)
        failed(line, EXIT_USAGE, {"error": line, "code": "local_error"})
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
