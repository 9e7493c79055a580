"""`peer status` and `peer repl`: a running daemon seen through its control socket.

`peer status` prints one screen and exits; `peer repl` keeps a prompt open (prompt_toolkit: completion,
history) and answers every control command while the peer trains.

Both fit the terminal, 80 columns included. A peer id is shown as its shortest unique prefix among the ids
on the screen, past the `12D3KooW` that every Ed25519 peer id starts with, and at least 8 characters long:
the characters that tell peers apart, in the order ids sort in (tables list peers sorted by id), and a
prefix that `ban` and `unban` accept as typed. A table too wide for the terminal shows the columns that
matter most (`NARROW_COLUMNS`) and folds long text; nothing is cut off with an ellipsis. `peer status
--wide`, and `wide` in the REPL, show full ids and every column. The command others join the run with is
printed whole, on a line of its own, so that it can be copied.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.table import Table

from shoal.peer.commands import ED25519_PREFIX, HELP, parse_peer_id
from shoal.peer.control import ControlClient, ControlError

HISTORY_FILE = Path.home() / ".shoal_repl_history"

SHORT_ID = 8  # characters past that prefix: about 46 bits, unique among any run's peers in practice
_B58 = "1-9A-HJ-NP-Za-km-z"
_ID_TOKEN = re.compile(rf"(?<![{_B58}])[{_B58}]{{40,64}}(?![{_B58}])")  # peer ids are 46-53 characters
FLEX_CELL = 24  # a column with a longer cell, or one with spaces, may be folded to fit the terminal
MIN_FLEX_WIDTH = 10  # narrower than this, a folded column is unreadable: let rich squeeze the table
MAX_WIDE = 1000  # `wide` lines may be this long; the terminal wraps them
BORDER = 3  # characters each column adds to a table (padding and its border), plus 1 for the table

# The columns a list shows when all of its columns do not fit the terminal (`wide` shows every one).
NARROW_COLUMNS = {
    "peers": ["peer_id", "address", "live", "finished_round", "heard_s_ago", "banned", "self"],
    "links": ["partner", "path", "rtt_ms", "payload_mb_s", "exchanges", "last_outcome"],
    "rounds": ["at", "round", "jumped_from", "partner", "outcome", "bytes_sent", "seconds", "train_loss"],
    "loss": ["at", "kind", "round", "inner_step", "train_loss", "eval_loss"],
}
REPL_HELP = {
    "wide": "full peer ids and every column (again: fit the terminal)  [on|off]",
    "quit": "leave the REPL; the peer trains on",
}


# --- peer ids -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def is_peer_id(text: str) -> bool:
    return parse_peer_id(text) is not None


def _id_body(peer_id: str) -> str:
    return peer_id[len(ED25519_PREFIX) :] if peer_id.startswith(ED25519_PREFIX) else peer_id


def short_ids(ids: Iterable[str], minimum: int = SHORT_ID) -> dict[str, str]:
    """Each id's shortest prefix that no other of `ids` shares, past the Ed25519 prefix, at least
    `minimum` characters long."""
    ids = set(ids)
    bodies = sorted({_id_body(i) for i in ids})
    need = dict.fromkeys(bodies, minimum)
    for a, b in itertools.pairwise(bodies):
        common = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        need[a], need[b] = max(need[a], common + 1), max(need[b], common + 1)
    return {i: _id_body(i)[: need[_id_body(i)]] for i in ids}


def peer_ids_in(value: Any) -> set[str]:
    """The peer ids anywhere in `value`: whole strings, or inside text (an address's /p2p/ID, a sentence)."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.update(token for token in _ID_TOKEN.findall(item) if is_peer_id(token))
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            stack += item
    return found


def id_shortener(value: Any, wide: bool = False) -> Callable[[str], str]:
    """A function that writes the peer ids in a text as their short names among the ids in `value`."""
    names = {} if wide else short_ids(peer_ids_in(value))
    if not names:
        return lambda text: text
    return lambda text: _ID_TOKEN.sub(lambda m: names.get(m[0], m[0]), text)


# --- tables that fit ------------------------------------------------------------------------------------
def _cell(value: Any, key: str = "", short: Callable[[str], str] = lambda text: text) -> str:
    if key == "at" and isinstance(value, float):  # a wall-clock timestamp
        return time.strftime("%H:%M:%S", time.localtime(value))
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return short(", ".join(value)) or "-"
    if isinstance(value, list | dict):
        return short(json.dumps(value))[:200]
    return "-" if value is None else short(str(value))


def _width(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


def _natural_width(headers: list[str], rows: list[list[str]]) -> int:
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return sum(widths) + BORDER * len(headers) + 1


def _fit(headers: list[str], rows: list[list[str]], width: int) -> list[int] | None:
    """Column widths that fit `width`: short columns whole, long or spaced ones (text, addresses) sharing
    the rest, to be folded. None when the table fits as it is, or cannot fit this way."""
    if _natural_width(headers, rows) <= width:
        return None
    cells = [[r[i] for r in rows] for i in range(len(headers))]
    words = [max(map(len, h.replace("_", " ").split()), default=1) for h in headers]
    need = [max([words[i]] + [_width(c) for c in cells[i]]) for i in range(len(headers))]
    flex = [i for i, column in enumerate(cells) if any(" " in c or _width(c) > FLEX_CELL for c in column)]
    widths = [need[i] for i in range(len(headers))]
    room = width - BORDER * len(headers) - 1 - sum(need[i] for i in range(len(headers)) if i not in flex)
    for left, i in enumerate(sorted(flex, key=lambda i: need[i])):
        share = room // (len(flex) - left)
        widths[i] = min(need[i], share)
        if widths[i] < min(need[i], MIN_FLEX_WIDTH):
            return None
        room -= widths[i]
    return widths if flex else None


def table(
    title: str, headers: list[str], rows: list[list[str]], width: int, wide: bool = False, header: bool = True
) -> Table:
    """`rows` under `headers`, at most `width` columns wide (unless `wide`): see `_fit`."""
    widths = None if wide else _fit(headers, rows, width)
    out = Table(title=title, show_header=header)
    for i, name in enumerate(headers):
        out.add_column(
            name.replace("_", " ") if widths else name,
            width=widths[i] if widths else None,
            overflow="fold",
            style="bold" if not header and i == 0 else None,
        )
    for row in rows:
        out.add_row(*row)
    return out


def _print(console: Console, renderable: RenderableType, wide: bool) -> None:
    """Prints at the terminal's width, or (`wide`) at the renderable's own width, for the terminal to wrap."""
    if wide:
        natural = console.measure(renderable, options=console.options.update_width(MAX_WIDE)).maximum
        if natural > console.width:
            console = Console(file=console.file, width=natural, force_terminal=console.is_terminal)
    console.print(renderable)


def render(console: Console, command: str, result: Any, wide: bool = False) -> None:
    """Lists of records become tables, maps become two columns, anything else is printed as is."""
    short = id_shortener(result, wide)
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        columns = list(dict.fromkeys(k for r in result for k in r))
        rows = [[_cell(r.get(c), c, short) for c in columns] for r in result]
        hidden: list[str] = []
        if not wide and command in NARROW_COLUMNS and _natural_width(columns, rows) > console.width:
            keep = [i for i, c in enumerate(columns) if c in NARROW_COLUMNS[command]]
            hidden = [c for i, c in enumerate(columns) if i not in keep]
            columns, rows = [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]
        _print(console, table(command, columns, rows, console.width, wide), wide)
        if hidden:
            console.print(f"(not shown at this width: {', '.join(hidden)}; `wide` shows them)", markup=False)
    elif isinstance(result, dict):
        rows = [[str(key), _cell(value, str(key), short)] for key, value in result.items()]
        _print(console, table(command, ["field", "value"], rows, console.width, wide, header=False), wide)
    elif isinstance(result, list):
        for line in result:
            console.print(short(str(line)), markup=False, highlight=False, soft_wrap=wide)
        if not result:
            console.print("(nothing yet)")
    else:
        console.print(short(str(result)), markup=False, soft_wrap=wide)


STATUS_FIELDS = [
    ("peer", "peer_id"), ("reachability", "reachability"), ("run", "run"),
    ("round", "round"), ("inner step", "inner_step"), ("inner steps/s", "inner_steps_per_s"),
    ("train loss", "train_loss"), ("eval loss", "eval_loss"), ("partner", "partner"), ("path", "path"),
    ("bytes sent/round", "bytes_sent_per_round"), ("bytes received/round", "bytes_received_per_round"),
    ("bits per parameter", "bits_per_param"), ("rounds done / swapped", None), ("peers known / live", None),
    ("bans", "bans"), ("doing", "activity"), ("why", "why"), ("last error", "last_error"),
]  # fmt: skip


def join_command(status: dict[str, Any]) -> str | None:
    """The command that joins this peer's run through it, or None before it listens."""
    address, run = status.get("address"), status.get("run")
    return f"peer join --run {run} --bootstrap {address}" if address and run else None


def render_status(console: Console, status: dict[str, Any], wide: bool = False) -> None:
    short = id_shortener(status, wide)
    rows = []
    for label, key in STATUS_FIELDS:
        if label == "rounds done / swapped":
            value = f"{status.get('rounds_done')} / {status.get('rounds_swapped')}"
        elif label == "peers known / live":
            value = f"{status.get('peers_known')} / {status.get('peers_live')}"
        else:
            assert key is not None  # only the two combined rows above have no key of their own
            value = _cell(status.get(key), key, short)
        rows.append([label, value])
    title = f"Shoal peer {short(str(status.get('peer_id', '?')))}"
    _print(console, table(title, ["field", "value"], rows, console.width, wide, header=False), wide)
    command = join_command(status)
    if command is None:
        console.print("Not listening yet: no address to join through.")
        return
    console.print("Others join this run with:")
    console.print(command, soft_wrap=True, markup=False, highlight=False)  # whole, on its own line


async def show_status(socket_path: Path, as_json: bool, wide: bool = False) -> int:
    client = await ControlClient.connect(socket_path)
    try:
        status = await client.call("status")
    finally:
        await client.close()
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        render_status(Console(), status, wide)
    return 0


def _wide_setting(args: list[str], current: bool) -> bool:
    if not args:
        return not current
    if args[0] in ("on", "off"):
        return args[0] == "on"
    raise ValueError(f"wide takes on or off, not {args[0]!r}")


async def repl(socket_path: Path, history: Path = HISTORY_FILE) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory

    console = Console()
    client = await ControlClient.connect(socket_path)
    words = [*HELP, *REPL_HELP, "exit"]
    with contextlib.suppress(ControlError):
        ids = [p["peer_id"] for p in await client.call("peers")]
        words += [*ids, *short_ids(ids).values()]  # `ban` takes either
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)), completer=WordCompleter(words, sentence=True)
    )
    console.print(f"Connected to {socket_path}. Type 'help' for commands, 'quit' to leave.", markup=False)
    wide = False
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
            if command == "wide":
                try:
                    wide = _wide_setting(args, wide)
                except ValueError as error:
                    console.print(f"error: {error}", markup=False)
                    continue
                console.print(f"wide: {'on, full peer ids and every column' if wide else 'off'}")
                continue
            try:
                result = await client.call(command, *args)
            except ControlError as error:
                console.print(f"error: {id_shortener(str(error), wide)(str(error))}", markup=False)
                continue
            except (ConnectionError, TimeoutError) as error:
                console.print(f"lost the connection to the peer: {error}")
                return 1
            if command == "status":
                render_status(console, result, wide)
            elif command == "help" and isinstance(result, dict):
                render(console, command, {**result, **REPL_HELP}, wide)
            else:
                render(console, command, result, wide)
    finally:
        await client.close()
    return 0
