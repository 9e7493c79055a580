"""How a daemon reaches other peers and how they reach it, through NATs.

`PeerReach` sets up the NAT layer (`transport/nat`) from the peer's options: it serves relaying and
STUN where asked, and behind a NAT holds a slot on each relay. It says which addresses the peer
publishes (membership, DHT, run state), connects to a peer by the best path (direct, punched, relayed;
punches run in the background), and measures each partner's path: round-trip time and the throughput
of round payloads (`TransferTimer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from shoal.errors import ShoalError
from shoal.gossip.membership import MAX_ADDRS
from shoal.peer.config import PeerConfig
from shoal.transport.errors import TransportError
from shoal.transport.host import Host
from shoal.transport.identity import PeerID
from shoal.transport.multiaddr import Multiaddr
from shoal.transport.nat import reachability
from shoal.transport.nat.paths import NatService

log = logging.getLogger(__name__)

RELAY_CONNECT_TIMEOUT = 5.0  # learning a relay's peer id by connecting to it
RELAY_PATIENCE = 30.0  # seconds to keep trying a relay that does not answer yet (as for a bootstrap)
# Reaching a peer through the NAT layer: a few direct dials (2 s each at most), then a relayed dial.
CONNECT_TIMEOUT = 10.0
# Starting the NAT layer: connecting to the relays, the dial-back verdict, a reservation on each relay.
START_TIMEOUT = 30.0
MAINTAIN_INTERVAL = 30.0  # relay reservations renewed, relayed partners punched again
RTT_TIMEOUT = 1.0
RTT_EVERY_ROUNDS = 10  # a partner's round-trip time is measured (one ping) this often, and when unknown
REACHABILITY_SERVERS = 2  # peers asked to dial us back when there is no relay to ask
REACHABILITY_TIMEOUT = 25.0  # all of their verdicts (each request has its own 10 s deadline)


class PeerReach:
    def __init__(self, host: Host, config: PeerConfig, address: str, nat: NatService):
        self.host = host
        self.config = config
        self.address = address  # where we listen, as a peer on our own network would dial it
        self.me = str(host.peer_id)
        self.nat = nat

    @classmethod
    async def start(
        cls, host: Host, config: PeerConfig, address: str, stack: contextlib.AsyncExitStack
    ) -> PeerReach:
        """The NAT layer, closed by `stack`: serves what the options say, reserves relay slots."""
        me = str(host.peer_id)
        relays = [addr for text in config.relays if (addr := await cls._relay(host, me, text)) is not None]
        nat_config = dataclasses.replace(config.nat_config(tuple(relays)), punch_in_background=True)
        nat = NatService(host, nat_config)
        stack.push_async_callback(nat.close)
        reach = cls(host, config, address, nat)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await nat.start()
        except TimeoutError:
            log.warning("[%s] the NAT layer did not finish starting in %.0f s (relays slow?); going on",
                        me, START_TIMEOUT)  # fmt: skip
        if relays:
            status = nat.reachability.status
            log.info("[%s] reachability: %s; holding %d relay reservation(s); publishing %s",
                     me, status, len(nat.reservations), ", ".join(reach.published()))  # fmt: skip
            if status != reachability.PUBLIC and not nat.reservations:
                log.warning("[%s] behind a NAT and no relay holds a slot for us: peers can reach us only "
                            "when we dial them", me)  # fmt: skip
        return reach

    @staticmethod
    async def _relay(host: Host, me: str, text: str) -> Multiaddr | None:
        """A relay's address with its peer id, learned by connecting where the option left it out. A relay
        that is still starting (a swarm's peers and its bootstrap start together) gets RELAY_PATIENCE."""
        addr = Multiaddr.parse(text)
        if addr.peer_id is not None:
            return addr
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + RELAY_PATIENCE, 0.25
        while True:
            try:
                async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
                    return addr.with_peer_id(await host.connect(addr))
            except (TimeoutError, OSError, TransportError) as error:
                if loop.time() + delay > deadline:
                    log.warning("[%s] relay %s does not answer (%s); going on without it",
                                me, text, error or "timed out")  # fmt: skip
                    return None
            await asyncio.sleep(delay)
            delay = min(4.0, delay * 2)

    def relayed(self) -> bool:
        """Behind a NAT and reachable through relays only."""
        nat = self.nat
        return bool(nat.reservations) and nat.reachability.status != reachability.PUBLIC

    def published(self) -> list[str]:
        """The addresses others should dial us at, best first."""
        nat_addrs = [str(a) for a in self.nat.addrs()]
        if self.relayed():
            # Behind a NAT: our listening address is private, and a dial to it from elsewhere would only
            # time out; publish what the NAT layer found (confirmed public addresses, relayed ones).
            return nat_addrs[:MAX_ADDRS]
        return list(dict.fromkeys([*nat_addrs, self.address]))[:MAX_ADDRS]

    def dht_addrs(self) -> list[str]:
        """What the DHT's own contact carries: nothing when we are relayed (a DHT client, which others do not
        put in their routing tables, so no lookup waits on a relay), else the published addresses. The
        run's provider record carries the published addresses either way."""
        return [] if self.relayed() else self.published()

    async def maintain_forever(self) -> None:
        """Keeps relay reservations alive and retries punches for partners still relayed."""
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL)
            try:
                await self.nat.maintain_once()
            except (OSError, TimeoutError, ShoalError) as error:
                log.warning("[%s] NAT maintenance failed this time: %s", self.me, error or "timed out")

    async def learn_reachability(self) -> None:
        """Without relays, ask the peers we joined through to dial us back, so that `peer status` can say
        whether others can reach us; behind a NAT, reserve a slot on those bootstrap peers that relay, so
        that a volunteer who gave nothing but `--bootstrap` can still be reached."""
        if self.config.relays or not self.config.bootstrap:
            return
        servers = self.host.connected_peers[:REACHABILITY_SERVERS]
        if not servers:
            return
        try:
            async with asyncio.timeout(REACHABILITY_TIMEOUT):
                self.nat.reachability = await reachability.check(self.host, servers)
        except (OSError, TimeoutError, ShoalError) as error:
            log.info("[%s] could not learn our reachability: %s", self.me, error)
            return
        status = self.nat.reachability.status
        if status not in (reachability.PRIVATE, reachability.FIREWALLED):
            return
        where = "behind a NAT" if status == reachability.PRIVATE else "firewalled"
        relays = [
            addr
            for text in self.config.bootstrap
            if (addr := await self._relay(self.host, self.me, text)) is not None
        ]
        held: list[Multiaddr | PeerID]  # the relays' addresses, or the ids of those that hold a slot
        try:
            async with asyncio.timeout(REACHABILITY_TIMEOUT):
                held = [addr for addr in relays if await self.nat.add_relay(addr)]
        except TimeoutError:
            held = [r.relay for r in self.nat.reservations]
        if held:
            names = ", ".join(map(str, held))
            log.info("[%s] this peer is %s: others reach it through the bootstrap relay %s; --stun lets it "
                     "punch holes to other NATed peers", self.me, where, names)  # fmt: skip
        else:
            log.warning("[%s] this peer is %s: peers cannot dial it, so it swaps only with peers it reaches "
                        "itself; start it with --relay ADDR (a public peer started with --serve-relay)",
                        self.me, where)  # fmt: skip

    async def connect(self, peer: PeerID, addrs: list[str]) -> None:
        """Connects to `peer` (unless we are) by the best path among `addrs`: direct, punched, relayed."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.nat.connect(peer, addrs)

    async def measure_rtt(self, partner: str, round_number: int) -> None:
        """A ping to a partner now and then, for `peer status` and `links`."""
        info = self.nat.paths.get(PeerID.from_string(partner))
        if info is None or (info.rtt_s is not None and round_number % RTT_EVERY_ROUNDS):
            return
        try:
            async with asyncio.timeout(RTT_TIMEOUT):
                await self.nat.measure_rtt(info.peer)
        except (TimeoutError, OSError, TransportError) as error:
            log.info("[%s] no round-trip time to %s: %s", self.me, partner, error or "timed out")

    def record(self, timer: TransferTimer, peer: str, partial: bool = False) -> None:
        """Feeds a timed message body into the path's throughput figure; with `partial`, also one cut
        short (what arrived until the cut: a lower bound of the path's rate, the figure a too-slow link
        is named by)."""
        end = timer.finished if timer.finished is not None else timer.last if partial else None
        if end is None or timer.started is None:
            return
        with contextlib.suppress(ValueError):
            self.nat.record_transfer(PeerID.from_string(peer), timer.nbytes, end - timer.started)

    def rate_bps(self, peer: str) -> float | None:
        """The measured throughput of the path to `peer`, in bits per second; None until measured."""
        try:
            info = self.nat.paths.get(PeerID.from_string(peer))
        except ValueError:
            return None
        return None if info is None or info.mb_s is None else info.mb_s * 8e6


class TransferTimer:
    """A `read_frame` progress callback that times a message from the moment its stream opened to its
    last byte: the throughput a round payload saw on the path. Used where the sender writes at once (an
    offer arriving); an answer comes only when the partner is ready, and its wait is not transfer time:
    there `from_first_byte` starts the clock when the answer's length arrives."""

    def __init__(self, from_first_byte: bool = False) -> None:
        self.started: float | None = None if from_first_byte else time.perf_counter()
        self.finished: float | None = None
        self.last: float | None = None  # when the latest piece arrived
        self.nbytes = 0  # the body's bytes so far
        self.total = 0  # the body's length, once known

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        self.last, self.nbytes, self.total = now, done, total
        if done == total:
            self.finished = now

    def rate_bps(self) -> float | None:
        """What the body delivered so far, in bits per second (None before a piece arrived)."""
        if self.started is None or self.last is None or self.last <= self.started or not self.nbytes:
            return None
        return 8 * self.nbytes / (self.last - self.started)
