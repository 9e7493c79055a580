"""The daemon: the composition root that wires membership, the round protocol and the worker together.

One asyncio process per peer. It listens for other peers on the secure transport (Noise + yamux; every
request arrives on a stream whose remote peer id the handshake proved), keeps the run's membership by
gossip, drives the training worker (a child process), and each round has `peer/round_swap.py` swap the
worker's payload with the round's partner under a deadline. A round applies a whole, validated partner
payload or none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import random
import signal
import socket
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from shoal.dht.keys import DHT_WORK_BITS
from shoal.dht.node import DHTNode
from shoal.errors import ShoalError
from shoal.gossip.membership import MAX_ADDRS, Membership
from shoal.gossip.rounds import payload as dense
from shoal.gossip.runstate import evidence
from shoal.peer import deadlines
from shoal.peer.addresses import advertised_host, listen_multiaddr, parse_address
from shoal.peer.commands import handlers as control_handlers
from shoal.peer.commands import resolve_peer
from shoal.peer.config import PeerConfig
from shoal.peer.control import SOCKET_NAME, ControlError, ControlServer
from shoal.peer.events import Events
from shoal.peer.guard_reports import GuardReports
from shoal.peer.identity_proof import prove_identity
from shoal.peer.ipc import SharedBuffer, WorkerGone, WorkerProcess
from shoal.peer.join_fetch import FetchFailed, JoinFetch
from shoal.peer.keys import resolve_identity
from shoal.peer.metrics import MetricsServer
from shoal.peer.offers import send_while_answered
from shoal.peer.progress import progress_bar, transfer_bar
from shoal.peer.reach import PeerReach, TransferTimer
from shoal.peer.request_slots import RequestSlots
from shoal.peer.round_swap import CONTROL_MESSAGE_LIMIT, RoundReport, RoundSwap, until_stopped
from shoal.peer.run_door import RunDoor
from shoal.peer.run_settings import run_settings, settings_mismatch, valid_settings
from shoal.peer.runstate_link import RUNSTATE_PROTOCOL, RunStateLink, key_of, peer_id_of
from shoal.peer.silence import SilenceWatch
from shoal.peer.status import LogTail, StatusBoard
from shoal.peer.weights import Snapshots, WeightsServer, made_up_weights
from shoal.peer.weights_fetch import WeightsFetcher
from shoal.peer.worker.presets import peer_number
from shoal.peer.worker.sources import resolve_data
from shoal.transport.errors import TransportError
from shoal.transport.host import Host, HostLimits, Stream
from shoal.transport.identity import PeerID
from shoal.transport.lograte import LogThrottle
from shoal.transport.messages import MessageError, read_frame, write_message
from shoal.transport.multiaddr import Multiaddr

log = logging.getLogger(__name__)

T = TypeVar("T")

# 2: signed membership entries; 3: full-duplex swaps; 4: weights streamed, resumable; 5: offers streamed;
# 6: weights in spans from several members, checked by probes
PROTOCOL_VERSION = 6
RUN_PROTOCOL = "/shoal/run/1.0.0"  # membership, status and the round swap, one request per stream
# Seconds a peer has to send a request's length prefix once the stream is open; the body then gets the
# time its size needs at the path's measured rate, and is cut after IDLE_TIMEOUT without a byte
# (peer/deadlines.py).
REQUEST_TIMEOUT = 10.0
# A request from a peer not (yet) in the membership: a joiner's membership swap (its table and settings),
# about 300 bytes a member it knows; 64 request slots of strangers hold at most 16 MiB.
STRANGER_REQUEST_LIMIT = 256 * 1024
CONNECT_TIMEOUT = 5.0
BOOTSTRAP_PATIENCE = 30.0  # seconds to keep trying the bootstrap addresses
# Seconds from the daemon's start after which a joiner gives up when no bootstrap address (nor any DHT
# contact) has answered at all: nothing listens there, or nothing gets through. A peer that started at the
# same time (a compose swarm) listens within a second or two; BOOTSTRAP_PATIENCE still applies to a bootstrap
# peer that answers while the run is not found yet. At least BOOTSTRAP_MIN_TRIES_S of tries once the NAT
# layer and the DHT are up, however long they took.
BOOTSTRAP_UNREACHABLE_S = 10.0
BOOTSTRAP_MIN_TRIES_S = 4.0
MEMBERS_TIMEOUT = 2.0  # one membership swap
READY_FANOUT = 8  # members told at once that we are ready; gossip tells the rest
WAIT_PEERS_PATIENCE = 60.0
DHT_TABLE_FILE = "dht-table.json"
WEIGHT_SOURCES = 6  # members a joiner may ask for the run's weights (3 at once), most advanced first
BELIEVABLE_LEAD = 10  # rounds past the run's (the third-highest published) a member's round is believed
RESUME_BEHIND_ROUNDS = 2  # rounds a resumed peer may lag the run and still go on from its own checkpoint
DHT_LOOKUP_TIMEOUT = 10.0
DHT_LOOKUPS_BEFORE_STARTING = 2  # empty run lookups in a live DHT before a joiner starts the run itself


class DaemonError(ShoalError):
    """The daemon cannot start or go on (unreachable bootstrap, worker failure)."""


class WorkerError(DaemonError):
    """The training worker stopped on an error; the message is the worker's own, `details` its traceback."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class Daemon:
    def __init__(self, config: PeerConfig, json_events: bool = False):
        # The data first: a wrong path, an empty folder or a binary file fail before anything starts.
        resolve_data(config.data)
        self.config = config
        self.key, self.peer_id, self.state_dir = resolve_identity(config)
        self.host: Host | None = None
        self.door = RunDoor(
            config.run_id, self.peer_id, config.token, config.closed,
            creator=None if config.bootstrap else self.peer_id, work_bits=config.identity_bits,
        )  # fmt: skip
        self.creator: str | None = self.door.creator  # the run's creator key
        self._joining = bool(config.bootstrap)
        self.runstate: RunStateLink | None = None
        self.dht: DHTNode | None = None
        self.events = Events(self.peer_id, json_events)
        self.board = StatusBoard(self.peer_id, config.run_id)
        self.events.listeners.append(self.board.on_event)
        self.parameters = 0
        self.log_tail = LogTail()
        self.membership: Membership | None = None
        self.worker: WorkerProcess | None = None
        self.snapshots = Snapshots()  # our slow weights of the last rounds, on disk, for joiners
        self.weights_server = WeightsServer(self.snapshots, self._message)
        self.address = ""  # the address we listen on, as others on our network would dial it
        self.reach: PeerReach | None = None
        # Addresses of run peers found in the DHT before they are members (peer id -> addresses).
        self.found_addrs: dict[str, list[str]] = {}
        # Bootstrap addresses: those that answered at all (even as another run's peer), and why the others
        # did not, for the error that names them.
        self._answered: set[str] = set()
        self._unanswered: dict[str, str] = {}
        # What makes replicas of one run compatible (run_settings): ours once the worker said hello, and
        # what members told us of theirs in membership swaps (bounded: one entry per member).
        self.settings: dict[str, Any] | None = None
        self._their_settings: dict[str, dict[str, Any]] = {}
        self._started = 0.0  # the event loop's clock when run() began
        self.stopping = asyncio.Event()
        self._requests: RequestSlots[Stream] = RequestSlots()
        self._strangers = LogThrottle(log)  # refused and bad requests: a few lines a minute per peer
        self.swap = RoundSwap(
            self.peer_id, config, self.board, self.stopping, self._request, self._message, self.publish_ban
        )
        self.guard_reports = GuardReports(self.peer_id, self.events, lambda: self.runstate)
        self.swap.excluded = self.guard_reports.excluded
        self.gossip_targets = self.swap.targets  # whom to gossip with and ask: who answered lately
        self.silence = SilenceWatch(
            self.peer_id, lambda: self.membership, self._report_silence, confirm_s=2 * config.fail_after
        )
        self.swap.accused = self.silence.accused

    @property
    def join_address(self) -> str:
        return self.address

    # The parts run() sets up before it starts anything that uses them. Only a peer's request can come
    # earlier (we listen first): one that needs them fails, and its stream is reset.
    @property
    def _host(self) -> Host:
        return _set_up(self.host, "host")

    @property
    def _peer_reach(self) -> PeerReach:
        return _set_up(self.reach, "NAT layer")

    @property
    def _dht(self) -> DHTNode:
        return _set_up(self.dht, "DHT node")

    @property
    def _membership(self) -> Membership:
        return _set_up(self.membership, "membership")

    def stop(self) -> None:
        """Asks the daemon to stop: the worker saves its state mid-round (within a step) and exits."""
        if not self.stopping.is_set():
            log.info("[%s] stopping", self.peer_id)
            self.stopping.set()

    # --- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        self._started = asyncio.get_running_loop().time()
        async with contextlib.AsyncExitStack() as stack:
            self.host = await Host.create(
                self.key, [listen_multiaddr(self.config.listen)], limits=HostLimits()
            )
            stack.push_async_callback(self.host.close)
            self.host.set_stream_handler(RUN_PROTOCOL, self._serve)
            bound = self.host.listen_addrs[0]
            host, port = bound.tcp_endpoint()
            self.address = str(
                Multiaddr.from_tcp(advertised_host(host), port, PeerID.from_string(self.peer_id))
            )
            self.reach = await PeerReach.start(self.host, self.config, self.address, stack)
            self.swap.reach = self.reach  # measured path rates set the rounds' deadlines
            # One nonce proves the run's identity work and the DHT's (which places the node by it).
            work = await prove_identity(
                self.state_dir, self.peer_id, max(self.config.identity_bits, DHT_WORK_BITS), self.stopping
            )
            if work is None:
                return 0  # stopped while proving its identity
            self.dht = await DHTNode.on_host(
                self.host, self.key, bootstrap=list(self.config.bootstrap),
                table_path=self.state_dir / DHT_TABLE_FILE, addrs=self.reach.dht_addrs(),
                reach=self.reach.connect, work=work,
            )  # fmt: skip
            stack.push_async_callback(self.dht.close)
            loop = asyncio.get_running_loop()
            self.membership = Membership(
                self.key,
                self.config.run_id,
                self.reach.published(),
                loop.time(),
                self.config.fail_after,
                incarnation=time.time_ns() // 10**6,
                admission=self.door.admission,
                token=self.door.packed_token,
                work_bits=self.config.identity_bits,
                work=work,
            )
            self.swap.membership = self.membership

            logging.getLogger().addHandler(self.log_tail)
            stack.callback(logging.getLogger().removeHandler, self.log_tail)
            self._handlers = control_handlers(self)
            control = ControlServer(self.state_dir / SOCKET_NAME, self._handlers)
            await control.start()
            stack.push_async_callback(control.close)
            if self.config.metrics:
                metrics = MetricsServer(*parse_address(self.config.metrics), status=self.status)
                try:
                    await metrics.start()
                except OSError as error:
                    raise DaemonError(
                        f"cannot serve metrics on {self.config.metrics}: {error.strerror or error}; "
                        "choose another --metrics HOST:PORT"
                    ) from error
                stack.push_async_callback(metrics.close)

            self.events.emit("listening", address=self.join_address, run=self.config.run_id)
            self.worker = await WorkerProcess.start()
            stack.push_async_callback(self.worker.stop)
            stack.callback(setattr, self.swap, "inbox", None)  # no payload lands in a segment being closed
            stack.callback(self.snapshots.close)
            stack.push_async_callback(self._leave)
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(self._gossip_forever()),
                    group.create_task(self.reach.maintain_forever()),
                ]
                try:
                    await self._bootstrap()
                    self._joining = False
                    # Before the first round: a peer behind a NAT publishes its relayed addresses before
                    # anyone pairs with it (a few seconds at most: one dial-back, one reservation).
                    await self.reach.learn_reachability()
                    await self._refresh_addrs()
                    runstate = await self._start_runstate(stack)
                    background.append(group.create_task(runstate.run_forever()))
                    return await self._drive_worker(self.worker)
                finally:
                    for task in background:
                        task.cancel()
        return 1  # not reached: the task group returns or raises

    # --- reaching peers ------------------------------------------------------------------------------
    async def _reach(self, target: str) -> PeerID:
        """The peer behind `target`, connected: a member's (or a DHT provider's) peer id, or an address
        (a bootstrap peer's, with or without its /p2p/ id)."""
        if target.startswith("/"):
            addr = Multiaddr.parse(target)
            if addr.peer_id is None:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    return await self._host.connect(addr)
            peer, addrs = addr.peer_id, [target]
        else:
            peer = PeerID.from_string(target)
            addrs = self._membership.addrs_of(target) or self.found_addrs.get(target, [])
        await self._peer_reach.connect(peer, addrs)
        return peer

    async def _refresh_addrs(self) -> None:
        """Publishes our addresses again when they changed (a reservation was lost or renewed)."""
        addrs = self._peer_reach.published()
        if list(self._membership.me.addrs) == addrs:
            return
        log.info("[%s] our addresses changed: %s", self.peer_id, ", ".join(addrs))
        self._membership.set_addrs(addrs)
        self._dht.core.set_addrs(self._peer_reach.dht_addrs())
        if self.runstate is not None:
            self.runstate.change("set_member", addrs=addrs, caps={"worker": "cpu"})
        await self._announce()

    async def _bootstrap(self) -> None:
        """Finds the run's peers: through the bootstrap address itself when it is a peer of the run, else
        through the DHT's provider records for the run. Without any address, this peer starts the run."""
        run = self.config.run_id
        if not self.config.bootstrap:
            await self._announce()
            log.info("[%s] started run %s; others join with: peer join --run %s --bootstrap %s",
                     self.peer_id, run, run, self.join_address)  # fmt: skip
            return
        ours = [a for a in self.config.bootstrap if f"/p2p/{self.peer_id}" in a]
        if ours:  # a bootstrap address with our own id: a copy of our key runs there, or nothing does
            await self._refuse_a_twin(ours)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOOTSTRAP_PATIENCE
        unreachable_by = max(self._started + BOOTSTRAP_UNREACHABLE_S, loop.time() + BOOTSTRAP_MIN_TRIES_S)
        delay, lookups_without_peers = 0.2, 0
        self.board.set_activity("joining", f"finding the peers of run {run} from {self.config.bootstrap[0]}")
        while not self.stopping.is_set():
            found = await self._run_peers_in_dht()
            lookups_without_peers = 0 if found else lookups_without_peers + 1
            for address in [*self.config.bootstrap, *found]:
                if await self._exchange_members(address):
                    log.info("[%s] joined run %s through %s", self.peer_id, run, address)
                    await self._refuse_a_twin(sorted(self._membership.claims_of_self))
                    await self._announce()
                    return
            if len(self._dht.core.table) and lookups_without_peers >= DHT_LOOKUPS_BEFORE_STARTING:
                # The network answers, and nobody announced this run in it: we are its first peer.
                self.creator = self.peer_id
                await self._announce()
                log.info("[%s] no peer of run %s in the DHT; started it, others join with --bootstrap %s",
                         self.peer_id, run, self.join_address)  # fmt: skip
                return
            # Nothing answered, and another round of tries would end past the bound: give up now.
            next_tries_end = loop.time() + delay + MEMBERS_TIMEOUT
            if not self._answered and not len(self._dht.core.table) and next_tries_end > unreachable_by:
                raise DaemonError(self._unreachable_message(loop.time() - self._started))
            if loop.time() > deadline:
                raise DaemonError(
                    f"found no peer of run {run} within {BOOTSTRAP_PATIENCE:.0f} s through "
                    f"{', '.join(self.config.bootstrap)}; check the address (copy it from what the run's "
                    "first peer printed) and that the peer there is running"
                )
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    def _unreachable_message(self, waited: float) -> str:
        """Which bootstrap addresses could not be reached, why, and what to check."""
        reasons = "; ".join(
            f"{address} ({self._unanswered.get(address, 'no answer')})" for address in self.config.bootstrap
        )
        ports = sorted({p for address in self.config.bootstrap if (p := _port_of(address)) is not None})
        what = f"TCP port {', '.join(map(str, ports))}" if ports else "its TCP port"
        which = "the bootstrap peer" if len(self.config.bootstrap) == 1 else "any bootstrap peer"
        return (
            f"cannot reach {which} within {math.ceil(waited)} s: {reasons}. Check the address (copy it "
            "from what the run's first peer printed), that the peer there is running, and that its firewall "
            f"lets {what} through"
        )

    async def _run_peers_in_dht(self) -> list[str]:
        """The run's peers from the DHT's provider records (ours excluded), their addresses noted."""
        try:
            async with asyncio.timeout(DHT_LOOKUP_TIMEOUT):
                providers = await self._dht.find_run_peers(self.config.run_id)
        except (TimeoutError, ShoalError) as error:
            log.info("[%s] DHT lookup of run %s failed: %s", self.peer_id, self.config.run_id, error)
            return []
        found = []
        self.found_addrs = {}  # only the latest lookup's: bounded by the providers one lookup returns
        for peer, addrs in providers:
            text = str(PeerID.from_bytes(peer)) if isinstance(peer, bytes) else str(peer)
            self.found_addrs[text] = [str(a) for a in addrs][:MAX_ADDRS]
            found.append(text)
        return found

    async def _announce(self) -> None:
        """Provider record for the run in the DHT, republished by the DHT node until we leave."""
        try:
            async with asyncio.timeout(DHT_LOOKUP_TIMEOUT):
                stored = await self._dht.announce_run(self.config.run_id, self._peer_reach.published())
        except (TimeoutError, ShoalError) as error:
            log.warning(
                "[%s] could not announce run %s in the DHT yet: %s", self.peer_id, self.config.run_id, error
            )
            return
        log.info("[%s] announced in the DHT (%d nodes hold the record)", self.peer_id, stored)

    async def _wait_for_peers(self) -> None:
        """Waits (at most WAIT_PEERS_PATIENCE) until `wait_peers` members, us included, can train."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_PEERS_PATIENCE
        wanted = self.config.wait_peers
        self.board.set_activity("waiting", f"waiting for {wanted} peers to be ready before the first round")
        with progress_bar("finding peers", wanted, enabled=not self.events.json_lines) as advance:
            while (ready := len(self._membership.ready(loop.time()))) < wanted and loop.time() < deadline:
                advance(ready)
                if self.stopping.is_set():
                    return
                await asyncio.sleep(0.1)
            advance(ready)

    async def _start_runstate(self, stack: contextlib.AsyncExitStack) -> RunStateLink:
        """The run's signed CRDT state: config (written by the creator), members, bans, checkpoints."""
        if self.creator is None:
            raise DaemonError("the bootstrap peer did not say who created the run; is it an older Shoal?")
        self.runstate = RunStateLink(
            self._host, self.key, self.config.run_id, self.creator, self.state_dir / "runstate",
            self._reach_member,
        )  # fmt: skip
        stack.push_async_callback(self.runstate.close)
        self._host.set_stream_handler(RUNSTATE_PROTOCOL, self.runstate.serve)
        self.runstate.add_peers([p for p in self._membership.live(asyncio.get_running_loop().time())])
        self.runstate.change("set_member", addrs=self._peer_reach.published(), caps={"worker": "cpu"})
        if self.creator == self.peer_id and not self.runstate.state.config():
            self.runstate.change("set_config", {"run": self.config.run_id, **self.config.worker_dict()})
        self.runstate.apply(self.runstate.state.announce())
        return self.runstate

    async def _refuse_a_twin(self, addresses: list[str]) -> None:
        """Refuses to run beside another live daemon of the run that uses our key (a copied key file)."""
        if addresses:
            try:
                await self._host.ensure_unique_identity(addresses)
            except TransportError as error:
                raise DaemonError(str(error)) from error

    async def _leave(self) -> None:
        """Tells a few peers we are leaving, so that nobody pairs with us again."""
        self.board.set_activity("stopping", "leaving the run and stopping the worker")
        if self.dht is not None:
            self.dht.withdraw_run(self.config.run_id)
        if self.membership is None:
            return
        self.membership.leave()
        loop = asyncio.get_running_loop()
        others = [p for p in self.membership.live(loop.time()) if p != self.peer_id]
        for peer in random.sample(others, min(3, len(others))):
            await self._exchange_members(peer, timeout=1.0)

    # --- the worker -------------------------------------------------------------------------------
    async def _drive_worker(self, worker: WorkerProcess) -> int:
        settings = self.config.worker_dict()
        # Every replica starts from the same weights (the run's seed); each reads its own data order.
        settings["init_seed"] = peer_number(f"{self.config.run_id}/init", 2**31)
        settings["data_seed"] = peer_number(f"{self.config.run_id}/{self.peer_id}", 2**31)
        settings["peer_id"] = self.peer_id
        self.board.set_activity("starting", "loading the model and data in the worker")
        checkpoint = str(self.state_dir / "checkpoint.pt")
        await worker.send({"type": "start", "settings": settings, "checkpoint": checkpoint})
        stop_watch = asyncio.create_task(self._close_worker_on_stop(worker))
        try:
            while (message := await worker.receive()) is not None:
                kind = message.get("type")
                if kind == "hello":
                    worker.attach(message)
                    spec = [(name, tuple(shape)) for name, shape in message["spec"]]
                    self.swap.use_model(spec, str(message["method"]), int(message["lattice_bits"]))
                    self.swap.inbox = _shared(worker.inbound).view  # partners' payloads land there
                    self.parameters = int(message["parameters"])
                    self.settings = run_settings(self.config, message)
                    if message.get("round"):  # resumed from a checkpoint
                        self.swap.book.last_finished = int(message["round"])
                    fields = ("parameters", "corpus_sha256", "shard")
                    self.events.emit("worker", **{k: message[k] for k in fields})
                    begin = await self._begin(worker, resumed=int(message.get("round") or 0))
                    if not self.stopping.is_set():  # a stopping worker was told so and no longer listens
                        await worker.send(begin)
                elif kind == "snapshot":  # the file a joining peer's fetch streams our weights from
                    number, nbytes, path = int(message["round"]), int(message["nbytes"]), str(message["path"])
                    if self.config.behave == "made_up_weights":  # test only: what a lying member would serve
                        path = made_up_weights(path)
                    self.snapshots.add(number, path, nbytes)
                elif kind == "verdict":
                    self.guard_reports.on_verdict(message)
                elif kind in ("progress", "eval"):
                    self.events.emit(kind, **{k: v for k, v in message.items() if k != "type"})
                elif kind == "payload":
                    await self._round(worker, message)
                elif kind == "done":
                    self.events.emit("done", round=message["round"], checkpoint=message["checkpoint"])
                    return 0
                elif kind == "error":
                    raise _worker_error(message)
            if self.stopping.is_set():
                return 0
            raise await _worker_exit(worker)
        except WorkerGone:  # it exited while we were telling it something: say why, if it said
            if self.stopping.is_set():
                return 0
            raise await _worker_exit(worker) from None
        finally:
            stop_watch.cancel()

    async def _begin(self, worker: WorkerProcess, resumed: int) -> dict[str, Any]:
        """The worker's go, once enough peers are ready: from a member's current weights when we join a run
        in progress. Only then do we say we are ready, so nobody is paired with us while we fetch."""
        loop = asyncio.get_running_loop()
        others = [p for p in self._membership.live(loop.time()) if p != self.peer_id]
        if not any(self._membership.members[p].round for p in others):  # the run's first round is ahead
            self._membership.set_ready()
            await self._wait_for_peers()
        begin = await self._join_weights(worker, resumed)
        self._membership.set_ready()
        await self._say_ready()
        return begin

    async def _say_ready(self) -> None:
        """Tells up to READY_FANOUT live members at once that we may be paired (our signed entry says so),
        in parallel, each within MEMBERS_TIMEOUT. Left to gossip (one member a second), the news took up to a
        second or two: a peer that restarted or joined chased a run of fast rounds that went on without it."""
        loop = asyncio.get_running_loop()
        others = [p for p in self._membership.live(loop.time()) if p != self.peer_id]
        random.shuffle(others)
        await asyncio.gather(*(self._exchange_members(p) for p in others[:READY_FANOUT]))

    async def _join_weights(self, worker: WorkerProcess, resumed: int) -> dict[str, Any]:
        """The weights the worker begins from: none (its own) unless the run is in progress, and for a peer
        resumed at round `resumed` (0: not resumed) unless the run is past it by RESUME_BEHIND_ROUNDS."""
        loop = asyncio.get_running_loop()
        others = [p for p in self._membership.live(loop.time()) if p != self.peer_id]
        if others:  # before any weight is fetched: does this peer train the same thing as the run?
            await self._check_run_settings(others)
        run_round = max((self._membership.members[p].round for p in others), default=0)
        if not others or run_round == 0 or (resumed and run_round - resumed <= RESUME_BEHIND_ROUNDS):
            return {"type": "begin", "weights_nbytes": 0}
        if resumed:  # it was down a while: the run's weights are worth more than its own older ones
            log.info("[%s] resumed at round %d, the run is at round %d: fetching the run's weights",
                     self.peer_id, resumed, run_round)  # fmt: skip
        self.board.set_activity("joining", "fetching the run's current weights from members")
        nbytes = 4 * dense.spec_size(self.swap.spec)
        into = _shared(worker.inbound).view(nbytes)  # the weights land in the worker's segment as they arrive
        fetcher = WeightsFetcher(
            self.peer_id,
            self._open_run_stream,
            self._message,
            self._peer_reach,
            connect_timeout=CONNECT_TIMEOUT,
        )
        excluded = self.guard_reports.excluded()
        members = [p for p in others if p not in excluded and p not in self.swap.banned]
        rounds = {p: self._membership.members[p].round for p in members}
        # Most advanced first, but not a member whose round is past what the run's members say (one that
        # claims round 2^62 would otherwise be asked first, and its round believed). Gossip lags fast rounds
        # (a member sent round 26 while the joiner had its round 19): a round a few past is believable.
        believable = evidence.run_round(list(rounds.values())) + BELIEVABLE_LEAD
        ranked = sorted(members, key=lambda p: (rounds[p] > believable, -rounds[p]))
        with transfer_bar("the run's weights", enabled=not self.events.json_lines) as bar:

            def progress(done: int, total: int) -> None:
                bar(done, total)
                text = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB"
                self.board.set_activity("joining", f"fetching the run's weights from members: {text}")

            join = JoinFetch(
                ranked[:WEIGHT_SOURCES],
                ranked,
                fetcher.attempt,
                fetcher.probe,
                progress,
            )
            try:
                fetched = await self._unless_stopping(join.run(into))
            except FetchFailed as error:
                start = f"its checkpoint of round {resumed}" if resumed else "the run's initial weights"
                log.warning(
                    "[%s] could not fetch the run's weights: %s; starting from %s", self.peer_id, error, start
                )
                return {"type": "begin", "weights_nbytes": 0}
            finally:
                into.release()
        if fetched is None:  # Ctrl-C or SIGTERM: the worker is told to stop, not to begin
            log.info("[%s] stopped while fetching the run's weights", self.peer_id)
            return {"type": "begin", "weights_nbytes": 0}
        number = min(fetched.round, believable)  # a lower round is caught up by the run's round clock
        self.swap.book.last_finished = number
        for peer, why in fetched.checks.items():
            log.info("[%s] the weights from %s: %s", self.peer_id, peer, why)
        self.events.emit(
            "weights",
            source=max(fetched.senders, key=lambda p: fetched.senders[p]),
            sources=fetched.senders,
            refused=fetched.refused,
            round=number,
            bytes_received=fetched.received,
        )
        return {"type": "begin", "weights_nbytes": nbytes, "round": number}

    async def _check_run_settings(self, others: list[str]) -> None:
        """Refuses to join a run that trains something else (another method, model, schedule or corpus)
        with one line that says which setting and what to pass; asks one member if none has said yet."""
        if not any(p in self._their_settings for p in others):
            await self._exchange_members(others[0])
        theirs = [self._their_settings[p] for p in others if p in self._their_settings]
        if not theirs or self.settings is None:
            return  # members of an older Shoal say nothing: nothing to compare
        runs = collections.Counter(json.dumps(s, sort_keys=True) for s in theirs)
        run = json.loads(runs.most_common(1)[0][0])
        problem = settings_mismatch(self.settings, run)
        if problem:
            raise DaemonError(f"cannot join run {self.config.run_id!r}: {problem}")

    async def _unless_stopping(self, coroutine: Awaitable[T]) -> T | None:
        """What `coroutine` returns, or None as soon as the daemon is asked to stop (it is cancelled)."""
        return (await until_stopped(coroutine, self.stopping))[1]

    async def _close_worker_on_stop(self, worker: WorkerProcess) -> None:
        await self.stopping.wait()
        with contextlib.suppress(WorkerGone):
            await worker.send({"type": "stop"})

    async def _round(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        started = time.monotonic()
        # Our payload is sent from the worker's segment, which it leaves alone until it hears back.
        with _shared(worker.outbound).view(int(message["nbytes"])) as payload:
            if self.config.behave == "silent":  # test only: no offer, no partner, and in no hurry
                await self._unless_stopping(asyncio.sleep(self.config.exchange_timeout))
                report = RoundReport(int(message["round"]), None, "skipped: silent (test behaviour)", 0, 0)
            else:
                report = await self.swap.swap(int(message["round"]), payload)
            sent_bytes = len(payload)
        number, seconds = report.number, time.monotonic() - started
        self.events.emit(
            "round",
            round=number,
            partner=report.partner,
            outcome=report.outcome,
            jumped_from=report.jumped_from,
            bytes_sent=report.bytes_sent,
            bytes_received=report.bytes_received,
            inner_step=message.get("inner_step"),
            train_loss=message.get("train_loss"),
            train_seconds=message.get("train_seconds"),
            encode_seconds=message.get("encode_seconds"),
            seconds=round(seconds, 3),
            bits_per_param=round(8 * sent_bytes / max(1, self.parameters), 3),
        )
        self.guard_reports.note_exclusions(number)
        if report.partner is not None and not report.heard and not self.stopping.is_set():
            why = report.outcome.removeprefix("skipped: ")
            self.silence.note(report.partner, number, why, asyncio.get_running_loop().time())
        if self.runstate is not None:
            self.runstate.change("set_round", number)
            self.runstate.state.set_metrics(train_loss=message.get("train_loss"), outcome=report.outcome[:40])
        if report.outcome == "swapped" or self.stopping.is_set():
            self.board.set_activity("training", f"training round {number + 1}")
        else:
            self.board.set_activity("training", f"training round {number + 1} (round {number} was skipped)")
            if report.partner is not None:
                self.board.error(f"round {number}: {report.outcome}")
        if self.stopping.is_set():
            return
        if report.outcome == "swapped":
            assert report.partner is not None  # a swapped round had a partner
            # What the swap took, waiting for the partner included: the worker overlaps its rounds while
            # that is a large share of its training (peer/worker/overlap.py Policy).
            await worker.send(
                {
                    "type": "partner",
                    "round": number,
                    "nbytes": report.payload_bytes,
                    "peer": report.partner,
                    "swap_seconds": round(seconds, 3),
                }
            )
            await self._peer_reach.measure_rtt(report.partner, number)
        else:
            await worker.send({"type": "skip", "round": number, "reason": report.outcome})

    def _report_silence(self, partner: str, number: int, why: str) -> None:
        key = key_of(partner)
        if key is not None and self.runstate is not None:
            self.runstate.change("report_silence", key, number, why)

    def status(self) -> dict[str, Any]:
        """What `peer status` shows; also the metrics endpoint's source."""
        return self._handlers["status"]([])

    def known_peers(self) -> set[str]:
        """Every peer id this daemon knows of: members (by gossip and in the run state), the run's
        providers in the DHT's latest answer, and the peers it banned."""
        known = set(self.swap.banned) | set(self.found_addrs)
        if self.membership is not None:
            known.update(self.membership.members)
        if self.runstate is not None:
            known.update(str(peer_id_of(m.key)) for m in self.runstate.state.members(time.time()))
        return known

    def ban(self, peer: str, why: str) -> str:
        """Stops pairing with `peer`, refuses its offers, and records the ban in the run state. `peer` is a
        full peer id or a unique prefix of a known peer's (`resolve_peer`); anything else raises
        ControlError and changes nothing. Returns the full id."""
        target = resolve_peer(peer, self.known_peers())
        if target == self.peer_id:
            raise ControlError(f"{target} is this peer's own id; a peer cannot ban itself")
        self.swap.banned.add(target)
        self.publish_ban(target, why)
        return target

    def unban(self, peer: str) -> str:
        """Pairs with a banned peer again (its full id, or a unique prefix of it); returns the full id.
        Raises ControlError, changing nothing, when no banned peer matches."""
        target = resolve_peer(peer, self.swap.banned, "banned peer", "`status` lists the bans")
        if target not in self.swap.banned:
            raise ControlError(f"{target} is not banned")
        self.swap.banned.discard(target)
        return target

    def publish_ban(self, peer: str, why: str) -> None:
        """Records a ban of ours in our run-state document, for the other members to see."""
        key = key_of(peer) if _is_peer_id(peer) else None
        if self.runstate is not None and key is not None:
            self.runstate.change("refuse_peer", key, why)

    # --- talking to other peers -------------------------------------------------------------------
    def _message(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": kind,
            "run": self.config.run_id,
            "from": self.peer_id,
            **fields,
        }

    async def _reach_member(self, peer: PeerID) -> None:
        await self._reach(str(peer))

    async def _request(
        self,
        target: str,
        message: dict,
        limit: int,
        progress: Any = None,
        pace: deadlines.Pace | None = None,
        body: memoryview | None = None,
    ) -> tuple[dict, int, int]:
        """One request on a fresh stream to `target` (a peer id or an address, see `_reach`): returns
        the answer and the bytes sent and received. `progress(done, total)` follows the answer's bytes;
        `pace`, when given, sees them arrive (its idle clock starts once the request is sent). `body`
        (an offer's payload) follows the message, streamed while the answer is awaited."""
        stream = await self._open_run_stream(target)
        try:
            sent = await write_message(stream, message)
            reader: Any = stream
            if pace is not None:
                pace.restart_idle()
                reader = pace.watch(stream)
            if body is None:
                await stream.close()  # our side is done: half-close
                reply, received = await read_frame(reader, limit, progress)
            else:
                (reply, received), body_sent = await send_while_answered(
                    stream, body, read_frame(reader, limit, progress)
                )
                sent += body_sent
        except BaseException:
            await stream.reset()
            raise
        return reply, sent, received

    async def _open_run_stream(self, target: str) -> Stream:
        """A fresh run-protocol stream to `target` (a peer id or an address, see `_reach`)."""
        peer = await self._reach(target)
        async with asyncio.timeout(CONNECT_TIMEOUT):  # lazy: our first bytes go without a round trip
            return await self._host.new_stream(peer, RUN_PROTOCOL, lazy=True)

    async def _exchange_members(self, target: str, timeout: float = MEMBERS_TIMEOUT) -> bool:
        """Swaps membership tables with `target` (a peer id or an address); False if it did not answer."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                reply, _, _ = await self._request(
                    target,
                    self._message("members", table=self._membership.table(), settings=self.settings),
                    CONTROL_MESSAGE_LIMIT,
                )
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            MessageError,
            DaemonError,
            TransportError,
            ValueError,  # an address or peer id that does not parse
        ) as error:
            if target in self.config.bootstrap:
                self._unanswered[target] = _why_unanswered(error, timeout, target)
            return False
        if target in self.config.bootstrap:
            self._answered.add(target)
        if self._joining:  # will the run take us? (later, what others say about it changes nothing)
            self.door.check_run(reply, target)
        if reply.get("run") != self.config.run_id:
            log.warning(
                "[%s] %s belongs to run %r, not %r",
                self.peer_id,
                target,
                reply.get("run"),
                self.config.run_id,
            )
            return False
        self._merge_members(reply.get("table"), loop.time(), target)
        settings, sender = reply.get("settings"), reply.get("from")
        if isinstance(sender, str) and sender in self._membership.members and valid_settings(settings):
            self._their_settings[sender] = settings
        creator = reply.get("creator")
        if self.creator is None and isinstance(creator, str) and len(creator) < 128 and _is_peer_id(creator):
            self.creator = creator
        return True

    def _merge_members(self, table: Any, now: float, source: str) -> None:
        new = self._membership.merge(table, now)
        refused = self._membership.refused
        if refused:  # one note per table, whatever it held: the throttle counts tables, not entries
            why = "; ".join(f"{count} {reason}" for reason, count in refused.most_common(4))
            self._strangers.note(logging.WARNING, "refused membership entries", source, why)
            refused.clear()
        for peer in new:
            self.events.emit("peer_joined", partner=peer, address=self._membership.addr_of(peer),
                             addresses=self._membership.addrs_of(peer))  # fmt: skip
        if new and self.runstate is not None:
            self.runstate.add_peers(new)

    async def _gossip_forever(self) -> None:
        loop = asyncio.get_running_loop()
        live_before: set[str] = set()
        while True:
            now = loop.time()
            self._membership.beat(now, self.swap.book.last_finished)
            live = set(self._membership.live(now))
            for gone in live_before - live:
                self.events.emit("peer_lost", partner=gone)
            live_before = live
            others = sorted(live - {self.peer_id})
            await self._refresh_addrs()
            self.gossip_targets.forget_all_but(self._membership.members)
            known = [p for p in self._membership.members if p != self.peer_id]
            if targets := self.gossip_targets.tick(others, known, now):
                # A live member at random and, when that one has not answered lately, one that has, at
                # once: members that never answer must not stall honest heartbeats (gossip/targets.py).
                answers = await asyncio.gather(*(self._exchange_members(t) for t in targets))
                for target, answered in zip(targets, answers, strict=True):
                    (self.gossip_targets.answered if answered else self.gossip_targets.failed)(
                        target, loop.time()
                    )
            elif not others:
                # Alone: everyone may have been presumed dead while we (or they) were busy, e.g. loading
                # torch. Knock on the bootstrap peers and the members we gave up on, so a split heals.
                candidates = [*self.config.bootstrap, *known]
                if candidates:
                    await self._exchange_members(random.choice(candidates))
            self.silence.check(now)
            self._membership.forget_dead(now)
            # Sum up throttled lines (refused requests, silent and unreachable partners, exclusions)
            # once their minute is over.
            self._strangers.flush()
            self.swap.flush_logs()
            self.silence.flush_logs()
            self.guard_reports.flush_logs()
            await asyncio.sleep(self.config.gossip_interval * random.uniform(0.8, 1.2))

    # --- serving other peers ----------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        sender = str(stream.remote_peer_id)  # proven by the Noise handshake
        admitted, evicted, why = self._requests.admit(sender, stream)
        if evicted is not None:  # a request parked unread the longest gives its slot to a newcomer
            evicted.reset_now("was reset: its request slot went to another request")
        if not admitted:
            self._strangers.note(logging.INFO, "refused a request", sender, why)
            await stream.reset()
            return
        try:
            request, size = await self._read_request(stream, sender)
            self._requests.read(stream)
            # Every answer has a deadline: a peer that stops reading loses its slot, never holds it.
            async with asyncio.timeout(self._answer_deadline(request.get("type"), size, sender)):
                await self._dispatch(sender, request, size, stream)
            await stream.close()
        except (MessageError, dense.PayloadError) as error:
            self._strangers.note(logging.WARNING, "dropped a bad request", sender, str(error))
            await stream.reset()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, TransportError) as error:
            self._strangers.note(logging.INFO, "request ended early", sender, type(error).__name__)
            await stream.reset()
        finally:
            self._requests.release(stream)

    async def _read_request(self, stream: Stream, sender: str) -> tuple[dict[str, Any], int]:
        """One request: its length prefix within REQUEST_TIMEOUT, then its body within the time its size
        needs at the path's measured rate (or the minimum), at most the exchange ceiling (a large request
        is an offer), and never IDLE_TIMEOUT without a byte (a slowloris is cut). What arrived of a body
        cut short still tells the path's rate, and names a link too slow for the rounds."""
        timer = TransferTimer()
        rate = self.reach.rate_bps(sender) if self.reach is not None else None
        stretch = deadlines.exchange_ceiling(self.config.exchange_timeout)  # for the body alone
        ceiling = REQUEST_TIMEOUT + stretch
        try:
            async with deadlines.paced(REQUEST_TIMEOUT) as pace:

                def progress(done: int, total: int) -> None:
                    timer(done, total)
                    if done == 0:  # the length prefix is in: the body gets the time its size needs
                        pace.extend(pace.waited() + deadlines.transfer_deadline(total, rate, stretch))
                    else:
                        pace.keep_up(done, total, timer.rate_bps(), ceiling)

                return await read_frame(pace.watch(stream), self._request_limit(sender), progress)
        finally:
            if self.reach is not None:  # not yet while the NAT layer starts
                self.reach.record(timer, sender, partial=True)
                if timer.finished is None and timer.nbytes:
                    self.swap.check_link(sender, timer.total)

    def _request_limit(self, sender: str) -> int:
        """The largest request `sender` may send: a control message's for a member (an offer's payload is
        streamed after its header, not read as one frame), a membership swap's for anyone else, so that
        strangers holding request slots hold little memory."""
        if self.membership is not None and sender in self.membership.members:
            return CONTROL_MESSAGE_LIMIT
        return STRANGER_REQUEST_LIMIT

    def _answer_deadline(self, kind: object, size: int, sender: str) -> float:
        """How long answering may take. An offer is held until our own round is ready
        (exchange_timeout), then its payload is read (at most the exchange ceiling; its own pace cuts a
        slow or silent sender sooner) and answered with a short accept (our payload travels in our own
        offer); weights are the model in fp32, at the requester's measured rate, or the minimum, within
        their ceiling."""
        rate = self.reach.rate_bps(sender) if self.reach is not None else None
        if kind == "offer":
            ceiling = deadlines.exchange_ceiling(self.config.exchange_timeout)
            return self.config.exchange_timeout + ceiling + REQUEST_TIMEOUT
        if kind == "weights":
            nbytes = 4 * dense.spec_size(self.swap.spec)
            return deadlines.transfer_deadline(nbytes, rate, deadlines.WEIGHTS_CEILING_S)
        return REQUEST_TIMEOUT

    async def _dispatch(self, sender: str, request: dict[str, Any], size: int, writer: Stream) -> None:
        if request.get("v") != PROTOCOL_VERSION or request.get("run") != self.config.run_id:
            raise MessageError(f"request for run {request.get('run')!r} version {request.get('v')!r}")
        kind = request.get("type")
        if request.get("from") != sender:
            raise MessageError(f"request claims to come from {str(request.get('from'))[:60]!r}")
        if sender in self.swap.banned and kind == "offer":
            await write_message(writer, self._message("refuse", reason="you are banned by this peer"))
            return
        if kind == "offer" and sender in self.guard_reports.excluded():
            reason = "you are excluded from pairing by the run (banned, or evidence of poisoned updates)"
            await write_message(writer, self._message("refuse", reason=reason))
            return
        loop = asyncio.get_running_loop()
        if self.config.behave == "silent" and kind in ("status", "offer"):
            await self.stopping.wait()  # test only (a sybil that stays in the run): held until cut
            return
        if kind == "members":
            self._merge_members(request.get("table"), loop.time(), sender)
            reply = self._message(
                "members",
                table=self._membership.table(),
                creator=self.creator,
                settings=self.settings,
                admission=self.door.mode,
                work_bits=self.config.identity_bits,
            )
            await write_message(writer, reply)
        elif kind == "status":
            await write_message(writer, self._message("status", **self.swap.status(request)))
        elif kind == "weights":
            member = self.membership is not None and sender in self.membership.members
            await self.weights_server.serve(sender, member, request, writer)
        elif kind == "probe":
            member = self.membership is not None and sender in self.membership.members
            await write_message(writer, await self.weights_server.probe(sender, member, request))
        elif kind == "offer":
            await self.swap.answer_offer(sender, request, size, writer)
        else:
            raise MessageError(f"unknown request type {kind!r}")


def _worker_error(message: dict[str, Any]) -> WorkerError:
    """The worker's own account of why it stopped, as the one line the user sees."""
    text = str(message.get("message") or "no reason given")
    if message.get("bug"):
        text = (
            f"the training worker failed: {text} (this is a bug in Shoal; please report it with the output "
            "of the same command run with --debug)"
        )
    return WorkerError(text, str(message.get("traceback") or ""))


async def _worker_exit(worker: WorkerProcess) -> DaemonError:
    """Why the worker is gone: its error message if one is still in the pipe, else how it exited."""
    with contextlib.suppress(TimeoutError, MessageError, OSError):
        async with asyncio.timeout(5.0):
            while (message := await worker.receive()) is not None:
                if message.get("type") == "error":
                    return _worker_error(message)
    with contextlib.suppress(TimeoutError, ProcessLookupError):
        async with asyncio.timeout(5.0):
            await worker.process.wait()
    code = worker.process.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? try a smaller --model or --batch-size)" if -code == signal.SIGKILL else ""
        return DaemonError(f"the training worker was killed by {name}{hint}")
    return DaemonError(
        f"the training worker exited unexpectedly (exit code {code}); its own messages are above, and "
        "--debug shows more"
    )


def _why_unanswered(error: BaseException, timeout: float, target: str) -> str:
    """Why the peer at `target` did not answer, in a few words for the user."""
    cause = error.__cause__
    if isinstance(error, TransportError) and isinstance(cause, OSError):  # a failed dial: the socket's reason
        error = cause
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: nothing listens on that port"
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:.0f} s"
    if isinstance(error, socket.gaierror):
        return f"unknown host name ({error.strerror})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (str(error).replace(target, "it").splitlines() or [type(error).__name__])[0][:200]
    if isinstance(error, MessageError | asyncio.IncompleteReadError):
        return f"it did not answer as a Shoal peer: {text}"
    return text


def _port_of(address: str) -> int | None:
    try:
        return parse_address(address)[1]
    except ShoalError:
        return None


def _shared(buffer: SharedBuffer | None) -> SharedBuffer:
    """A shared-memory buffer of the worker's, which its hello names before it sends anything else."""
    if buffer is None:
        raise DaemonError("the training worker used shared memory before its hello named it")
    return buffer


def _set_up(part: T | None, what: str) -> T:
    """One of the parts that `Daemon.run()` sets up before anything else uses it."""
    if part is None:
        raise RuntimeError(f"the daemon's {what} was used before run() set it up")
    return part


def _is_peer_id(text: str) -> bool:
    try:
        return key_of(text) is not None
    except ValueError:
        return False
