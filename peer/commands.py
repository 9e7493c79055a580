"""The control socket's commands: what `peer status` and the REPL can ask a running daemon.

Each handler takes the command's arguments and returns plain data (msgpack-able). They read the
daemon's state and never block; `ban` and `unban` are the only ones that change anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from shoal.errors import ShoalError
from shoal.peer.control import ControlError
from shoal.transport.identity import MAX_PEER_ID_TEXT_LENGTH, PeerID

if TYPE_CHECKING:
    from shoal.dht.node import DHTNode
    from shoal.gossip.membership import Membership
    from shoal.peer.config import PeerConfig
    from shoal.peer.reach import PeerReach
    from shoal.peer.round_swap import RoundSwap
    from shoal.peer.runstate_link import RunStateLink
    from shoal.peer.status import LogTail, StatusBoard
    from shoal.transport.nat.paths import NatService

DEFAULT_TAIL = 20
MAX_TAIL = 500
ED25519_PREFIX = "12D3KooW"  # the text of every Ed25519 peer id starts so (its key's fixed header)
B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MIN_PREFIX = 4  # characters a prefix needs past 12D3KooW, so that a slip of the keyboard bans nobody
REACHABILITY = {
    "public": "public: others dial {addrs}",
    "private": "behind a NAT: others reach it through {addrs}",
    "firewalled": "firewalled: nobody can dial it; it swaps only with peers it dials itself",
    "unknown": "not checked (no relay and no bootstrap peer to dial it back): others dial {addrs}",
}

HELP = {
    "status": "one screen: identity, run, round, losses, partner, traffic, peers, bans, last error",
    "peers": "the run's members as this peer sees them",
    "links": "per partner: path, round-trip estimate, throughput, last exchange",
    "rounds": "recent rounds: partner, bytes, time, swapped or skipped and why, jumps  [N]",
    "loss": "recent train and eval losses  [N]",
    "config": "this peer's configuration",
    "dht": "the DHT's routing table and records held",
    "state": "the run's shared state as this peer sees it",
    "why": "why the peer is idle or slow right now, in one sentence",
    "log": "the last lines of this peer's log  [N]",
    "ban": "stop pairing with a peer and refuse its offers  PEER (its id, or a unique prefix of it)",
    "unban": "pair with a banned peer again  PEER (its id, or a unique prefix of it)",
    "help": "this list",
}


class Daemon(Protocol):
    """What the control commands read of a running daemon, and the two things they may change."""

    peer_id: str
    config: PeerConfig
    board: StatusBoard
    swap: RoundSwap
    log_tail: LogTail
    membership: Membership | None
    reach: PeerReach | None
    dht: DHTNode | None
    runstate: RunStateLink | None

    def ban(self, peer: str, why: str) -> str: ...

    def unban(self, peer: str) -> str: ...


def handlers(daemon: Daemon) -> dict[str, Any]:
    def status(_: list[Any]) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        board = daemon.board.snapshot()
        members = daemon.membership.members if daemon.membership else {}
        live = daemon.membership.live(now) if daemon.membership else []
        current = daemon.swap.book.current
        last = daemon.swap.reports[-1] if daemon.swap.reports else None
        partner = current.partner if current else (last.partner if last else None)
        return {
            **board,
            "reachability": _reachability(daemon),
            "addresses": daemon.reach.published() if daemon.reach else [],
            "relay_reservations": len(nat.reservations) if (nat := _nat(daemon)) else 0,
            "partner": partner,
            "path": _path_to(daemon, partner)["path"] if partner else None,
            "bits_per_param": daemon.board.values.get("bits_per_param"),
            "peers_known": len(members),
            "peers_live": len(live),
            "bans": sorted(daemon.swap.banned),
        }

    def peers(_: list[Any]) -> list[dict[str, Any]]:
        if daemon.membership is None:
            return []
        now = asyncio.get_running_loop().time()
        return [
            {
                "peer_id": m.peer_id,
                "address": m.addr,
                "addresses": list(m.addrs),
                "live": daemon.membership.is_live(m.peer_id, now),
                "left": m.left,
                "finished_round": m.round,
                "heard_s_ago": round(now - m.changed_at, 1),
                "banned": m.peer_id in daemon.swap.banned,
                "self": m.peer_id == daemon.peer_id,
            }
            for m in sorted(daemon.membership.members.values(), key=lambda m: m.peer_id)
        ]

    def links(_: list[Any]) -> list[dict[str, Any]]:
        """Per partner: the NAT layer's path (and why), its RTT and payload throughput, and the rounds."""
        return [
            {
                "partner": link.partner,
                **_path_to(daemon, link.partner),
                "exchanges": link.exchanges,
                "last_outcome": link.last_outcome,
                "last_exchange_s_ago": round(time.time() - link.last_exchange_at, 1),
                "last_exchange_s": round(link.last_seconds, 3),
            }
            for link in daemon.board.links.values()
        ]

    def rounds(args: list[Any]) -> list[dict[str, Any]]:
        return list(daemon.board.rounds)[-_count(args) :]

    def loss(args: list[Any]) -> list[dict[str, Any]]:
        return list(daemon.board.losses)[-_count(args) :]

    def config(_: list[Any]) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(daemon.config).items()
        }

    def dht(_: list[Any]) -> dict[str, Any]:
        node = daemon.dht
        if node is None:
            return {"note": "the DHT starts with the daemon"}
        return {
            "node_id": node.core.contact.id.to_bytes(32, "big").hex()[:16],
            "routing_table_size": len(node.core.table),
            "records_held": len(node.core.store),
            "run_announced": daemon.config.run_id,
            "addresses": node.addrs,
            "mode": "server" if node.addrs else "client (relayed behind a NAT: not in routing tables)",
        }

    def state(_: list[Any]) -> dict[str, Any]:
        """The run's signed CRDT state as this peer holds it (gossip/runstate)."""
        if daemon.runstate is None:
            return {"run": daemon.config.run_id, "note": "the run state starts once the peer has joined"}
        return {"run": daemon.config.run_id, **daemon.runstate.view()}

    def why(_: list[Any]) -> str:
        return daemon.board.why()

    def log(args: list[Any]) -> list[str]:
        return list(daemon.log_tail.lines)[-_count(args) :]

    def ban(args: list[Any]) -> str:
        peer = daemon.ban(_peer_arg(args), "banned by its operator from the REPL")
        return f"banned {peer}: no pairing with it, its offers refused"

    def unban(args: list[Any]) -> str:
        return f"unbanned {daemon.unban(_peer_arg(args))}"

    def help_(_: list[Any]) -> dict[str, str]:
        return HELP

    return {
        "status": status, "peers": peers, "links": links, "rounds": rounds, "loss": loss, "config": config,
        "dht": dht, "state": state, "why": why, "log": log, "ban": ban, "unban": unban, "help": help_,
    }  # fmt: skip


def _nat(daemon: Daemon) -> NatService | None:
    return daemon.reach.nat if daemon.reach is not None else None


def _reachability(daemon: Daemon) -> str:
    reach = daemon.reach
    if reach is None:
        return "unknown: the peer is starting"
    status = reach.nat.reachability.status
    addrs = ", ".join(reach.published()) or "no address"
    return REACHABILITY.get(status, status).format(addrs=addrs)


def _path_to(daemon: Daemon, partner: str) -> dict[str, Any]:
    """What the NAT layer knows of the path to `partner`: which, why, RTT, payload throughput."""
    try:
        nat = _nat(daemon)
        info = nat.paths.get(PeerID.from_string(partner)) if nat else None
    except ValueError:
        info = None
    if info is None:
        return {"path": "not connected", "path_reason": None, "rtt_ms": None, "payload_mb_s": None}
    return {
        "path": info.path,
        "path_reason": info.reason,
        "rtt_ms": round(info.rtt_s * 1e3, 2) if info.rtt_s is not None else None,
        "payload_mb_s": round(info.mb_s, 2) if info.mb_s is not None else None,
    }


def _count(args: list[Any]) -> int:
    if not args:
        return DEFAULT_TAIL
    try:
        return max(1, min(MAX_TAIL, int(args[0])))
    except (TypeError, ValueError) as error:
        raise ControlError(f"expected a number of lines, got {args[0]!r}") from error


def _peer_arg(args: list[Any]) -> str:
    if len(args) != 1 or not isinstance(args[0], str) or not 0 < len(args[0]) <= MAX_PEER_ID_TEXT_LENGTH:
        raise ControlError("expected one peer id, or a prefix of one")
    return args[0]


def parse_peer_id(text: str) -> str | None:
    """`text` when it is a whole, valid peer id, else None. The multihash check alone is not enough: the
    first 12 characters of every Ed25519 id parse as a (short) identity multihash; its key must decode too."""
    try:
        peer = PeerID.from_string(text)
        peer.public_key()
    except (ValueError, ShoalError):
        return None
    return text if str(peer) == text else None


def resolve_peer(
    text: str,
    known: Iterable[str],
    among: str = "member of this run",
    listed: str = "`peers` lists the members (a full peer id names any peer)",
) -> str:
    """The full peer id that `text` names: a valid full peer id (shoal.transport.identity), or a prefix
    of exactly one of `known`, with or without the `12D3KooW` every Ed25519 id starts with (the REPL shows
    ids without it). Anything else raises ControlError, saying why and what to type instead."""
    known, text = set(known), text.strip()
    if text in known:
        return text
    full = parse_peer_id(text)
    if full is not None:
        return full
    bad = sorted(set(text) - set(B58_ALPHABET))
    if bad:
        raise ControlError(
            f"{text!r} is not a peer id: {', '.join(map(repr, bad))} cannot occur in one (base58: no 0, O, "
            "I or l); `peers` lists the run's members"
        )
    if ED25519_PREFIX.startswith(text):
        raise ControlError(
            f"every Ed25519 peer id starts with {ED25519_PREFIX}: give the characters after it"
        )
    body = text.removeprefix(ED25519_PREFIX)
    if len(body) < MIN_PREFIX:
        raise ControlError(f"{text!r} is too short to name a peer: give at least {MIN_PREFIX} characters")
    matches = sorted(k for k in known if k.startswith(text) or k.startswith(ED25519_PREFIX + text))
    if not matches:
        raise ControlError(f"no {among} has a peer id starting with {text!r}; {listed}")
    if len(matches) > 1:
        shown = ", ".join(m.removeprefix(ED25519_PREFIX)[: len(body) + 4] + "…" for m in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise ControlError(f"{text!r} could be any of {len(matches)} peers ({shown}{more}): type more of it")
    return matches[0]
