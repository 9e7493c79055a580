"""`peer status` and `peer repl`: a running daemon seen through its control socket.

`peer status` prints one screen and exits; `peer repl` keeps a prompt open (prompt_toolkit: completion,
history) and answers every control command while the peer trains.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shoal.peer.commands import HELP
from shoal.peer.control import ControlClient, ControlError

HISTORY_FILE = Path.home() / ".shoal_repl_history"


def render(console: Console, command: str, result: Any) -> None:
    """Lists of records become tables, maps become two columns, anything else is printed as is."""
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        table = Table(title=command)
        columns = list(dict.fromkeys(k for r in result for k in r))
        for column in columns:
            table.add_column(column)
        for record in result:
            table.add_row(*(_cell(record.get(c), c) for c in columns))
        console.print(table)
    elif isinstance(result, dict):
        table = Table(title=command, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key, value in result.items():
            table.add_row(key, _cell(value))
        console.print(table)
    elif isinstance(result, list):
        for line in result:
            console.print(line, markup=False, highlight=False)
        if not result:
            console.print("(nothing yet)")
    else:
        console.print(str(result), markup=False)


def _cell(value: Any, key: str = "") -> str:
    if key == "at" and isinstance(value, float):  # a wall-clock timestamp
        return time.strftime("%H:%M:%S", time.localtime(value))
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)[:200]
    return "-" if value is None else str(value)


STATUS_FIELDS = [
    ("peer", "peer_id"), ("address", "address"), ("reachability", "reachability"), ("run", "run"),
    ("round", "round"), ("inner step", "inner_step"), ("inner steps/s", "inner_steps_per_s"),
    ("train loss", "train_loss"), ("eval loss", "eval_loss"), ("partner", "partner"), ("path", "path"),
    ("bytes sent/round", "bytes_sent_per_round"), ("bytes received/round", "bytes_received_per_round"),
    ("bits per parameter", "bits_per_param"), ("rounds done / swapped", None), ("peers known / live", None),
    ("bans", "bans"), ("doing", "activity"), ("why", "why"), ("last error", "last_error"),
]  # fmt: skip


def render_status(console: Console, status: dict[str, Any]) -> None:
    table = Table(title=f"Shoal peer {status.get('peer_id', '?')[:12]}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for label, key in STATUS_FIELDS:
        if label == "rounds done / swapped":
            value = f"{status.get('rounds_done')} / {status.get('rounds_swapped')}"
        elif label == "peers known / live":
            value = f"{status.get('peers_known')} / {status.get('peers_live')}"
        else:
            assert key is not None  # only the two combined rows above have no key of their own
            value = _cell(status.get(key))
        table.add_row(label, value)
    console.print(table)


async def show_status(socket_path: Path, as_json: bool) -> int:
    client = await ControlClient.connect(socket_path)
    try:
        status = await client.call("status")
    finally:
        await client.close()
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        render_status(Console(), status)
    return 0


async def repl(socket_path: Path, history: Path = HISTORY_FILE) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory

    console = Console()
    client = await ControlClient.connect(socket_path)
    words = [*HELP, "quit", "exit"]
    with contextlib.suppress(ControlError):
        words += [p["peer_id"] for p in await client.call("peers")]
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)), completer=WordCompleter(words, sentence=True)
    )
    console.print(f"Connected to {socket_path}. Type 'help' for commands, 'quit' to leave.")
    try:
        while True:
            try:
                line = await session.prompt_async("shoal> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                continue
            try:
                words_in = shlex.split(line)
            except ValueError as error:
                console.print(f"cannot read that line: {error}")
                continue
            if not words_in:
                continue
            command, args = words_in[0], words_in[1:]
            if command in ("quit", "exit"):
                break
            try:
                result = await client.call(command, *args)
            except ControlError as error:
                console.print(f"error: {error}", markup=False)
                continue
            except (ConnectionError, TimeoutError) as error:
                console.print(f"lost the connection to the peer: {error}")
                return 1
            if command == "status":
                render_status(console, result)
            else:
                render(console, command, result)
    finally:
        await client.close()
    return 0
