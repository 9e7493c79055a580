"""The control socket: a Unix socket (mode 0600) in the peer's state directory, msgpack request/response.

`peer status`, `peer repl` and anything else on the same machine ask the daemon questions here. A
request is `{"cmd": NAME, "args": [...]}`; the answer is `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`. Read-only commands need nothing more (the socket's mode already limits
who may connect); commands that change the peer (`ban`, `unban`) are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.transport.messages import MessageError, read_message, write_message

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024  # commands are short; answers may be larger
MAX_ANSWER_BYTES = 8 << 20
MAX_CLIENTS = 8
CLIENT_IDLE_TIMEOUT = 300.0  # a REPL may sit idle for a while, not forever
CHANGING = ("ban", "unban")  # logged when used

Handler = Callable[[list[Any]], Awaitable[Any] | Any]


class ControlError(ShoalError):
    """The control socket could not be reached, or the daemon refused a command."""


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]):
        self.path = path
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if await _is_alive(self.path):
                raise ControlError(
                    f"another daemon already serves {self.path}; use another --state-dir or stop that peer"
                )
            self.path.unlink()  # left behind by a peer that died
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._clients:
            try:
                while True:
                    async with asyncio.timeout(CLIENT_IDLE_TIMEOUT):
                        request = await read_message(reader, MAX_REQUEST_BYTES)
                    await write_message(writer, await self._answer(request))
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                pass
            except MessageError as error:
                log.warning("control socket: dropped a bad request: %s", error)
            finally:
                writer.close()

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        command, args = request.get("cmd"), request.get("args", [])
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None or not isinstance(args, list):
            return {"ok": False, "error": f"unknown command {command!r}; try 'help'"}
        if command in CHANGING:
            log.info("control socket: %s %s", command, " ".join(map(str, args)))
        try:
            result = handler(args)
            if asyncio.iscoroutine(result):
                result = await result
        except ShoalError as error:
            return {"ok": False, "error": str(error)}
        return {"ok": True, "result": result}


async def _is_alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


class ControlClient:
    """Blocking-free client used by `peer status` and the REPL: one connection, many requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 5.0) -> ControlClient:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 16)
        except (OSError, TimeoutError) as error:
            raise ControlError(
                f"cannot reach the peer's control socket {path}: {error}; is the peer running?"
            ) from error
        return cls(reader, writer)

    async def call(self, command: str, *args: Any, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            await write_message(self.writer, {"cmd": command, "args": list(args)})
            answer = await read_message(self.reader, MAX_ANSWER_BYTES)
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error")))
        return answer.get("result")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def find_socket(state_dir: str | None, run_id: str | None, runs_root: Path = Path("runs")) -> Path:
    """The control socket of one peer: in --state-dir, or the only live peer of --run under ./runs."""
    if state_dir:
        return Path(state_dir) / SOCKET_NAME
    pattern = f"{run_id}/**/{SOCKET_NAME}" if run_id else f"**/{SOCKET_NAME}"
    found = [p for p in sorted(runs_root.glob(pattern)) if _answers(p)] if runs_root.exists() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError(
            f"no running peer found under {runs_root}/; pass --state-dir DIR (the folder with control.sock)"
        )
    listing = "\n  ".join(str(p.parent) for p in found)
    raise ControlError(f"several peers found; choose one with --state-dir:\n  {listing}")


def _answers(path: Path) -> bool:
    """Whether a daemon listens on this socket (a dead peer leaves its socket file behind)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
