"""Transport benchmark: Shoal's Noise+yamux host against a raw uvloop TCP socket and py-libp2p 0.8.1.

    python -m bench.transport --json bench/out/transport.json [--mib 64] [--repeats 3]

Everything runs in one invocation on loopback, so the ratios compare runs made seconds apart on the same
(shared, noisy) machine. Each variant's server runs in its own process, as a real peer would, and the
client in this one:

- throughput: one stream (one socket for raw TCP) carries `--mib` MiB to a sink that answers with the
  count once it has read everything; best of `--repeats` (the least disturbed by other load). TCP and
  Shoal transfers alternate; ratio_vs_tcp is the median of the paired ratios,
- rtt: 64-byte echo round trips on one open stream, p50 over 200,
- cpu: sender plus receiver CPU seconds for the transfers, reported as MB per CPU-second,
- connect: a fresh connection each time (TCP for raw; TCP + multistream + Noise XX + yamux for Shoal and
  py-libp2p), p50 over 20 (5 for py-libp2p, whose dials are slow).

py-libp2p's side is `tests/transport/libp2p_peer.py` (trio, both its client and server), skipped when
`libp2p` is not importable. Writes {"throughput_mb_s", "rtt_us", "connect_ms", "ratio_vs_tcp",
"ratio_vs_libp2p"} and prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvloop

from shoal.transport.host import Host
from shoal.transport.identity import generate_key

MIB = 1 << 20
# The whole benchmark must end: a hung variant is a failure to report, not a CI job stuck for hours.
WALL_CLOCK_GUARD_S = 600
# One variant's server has this long to start and print its address (py-libp2p imports in ~2 s).
SERVER_START_S = 60
RTT_ROUNDS = 200
CONNECT_ROUNDS = 20
# py-libp2p is 20x slower per transfer and starts a trio process per run: three runs bound the time.
LIBP2P_REPEATS = 3
PEER_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "transport" / "libp2p_peer.py"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc), to normalise by work done."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- servers


async def _sink(stream) -> None:
    total = 0
    while data := await stream.read():
        total += len(data)
    await stream.write(str(total).encode())
    await stream.close()


async def _echo(stream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


async def serve(kind: str) -> None:
    """Run one variant's server; print {"addr": ...}; stop when stdin closes."""
    loop = asyncio.get_running_loop()
    if kind == "shoal":
        host = await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"])
        host.set_stream_handler("/sink/1.0.0", _sink)
        host.set_stream_handler("/echo/1.0.0", _echo)
        addr = str(host.listen_addrs[0].with_peer_id(host.peer_id))
    else:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            mode = await reader.read(1)  # b"" for the connect-time probes, which just close
            if mode == b"s":
                total = 0
                while data := await reader.read(MIB):
                    total += len(data)
                writer.write(str(total).encode())
            elif mode == b"e":
                while data := await reader.read(65536):
                    writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    print(json.dumps({"addr": addr}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    if kind == "shoal":
        await host.close()
    else:
        server.close()


# ---------------------------------------------------------------------------------------------- clients


class ShoalClient:
    def __init__(self, addr: str, server_pid: int) -> None:
        self.addr, self.server_pid = addr, server_pid

    async def __aenter__(self) -> ShoalClient:
        self.host = await Host.create(generate_key())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.host.close()

    async def connect_ms(self) -> float:
        start = time.perf_counter()
        peer = await self.host.connect(self.addr)
        elapsed = (time.perf_counter() - start) * 1e3
        await self.host.disconnect(peer)
        return elapsed

    async def rtts_us(self, rounds: int) -> list[float]:
        peer = await self.host.connect(self.addr)
        stream = await self.host.new_stream(peer, "/echo/1.0.0")
        out = []
        message = b"x" * 64
        for _ in range(rounds):
            start = time.perf_counter()
            await stream.write(message)
            await stream.readexactly(64)
            out.append((time.perf_counter() - start) * 1e6)
        await stream.close()
        return out

    async def transfer(self, payload: bytes) -> tuple[float, float]:
        """(MB/s, CPU seconds of both processes) for one one-stream transfer of `payload`."""
        peer = await self.host.connect(self.addr)
        stream = await self.host.new_stream(peer, "/sink/1.0.0")
        cpu_start = time.process_time() + process_cpu_s(self.server_pid)
        start = time.perf_counter()
        await stream.write(payload)
        await stream.close()
        reply = await stream.read()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() + process_cpu_s(self.server_pid) - cpu_start
        assert int(reply) == len(payload), f"sink counted {reply!r}"
        return len(payload) / elapsed / 1e6, cpu


class TcpClient:
    def __init__(self, addr: str, server_pid: int) -> None:
        host, port = addr.split(":")
        self.host, self.port, self.server_pid = host, int(port), server_pid

    async def __aenter__(self) -> TcpClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        pass

    async def connect_ms(self) -> float:
        start = time.perf_counter()
        _, writer = await asyncio.open_connection(self.host, self.port)
        elapsed = (time.perf_counter() - start) * 1e3
        writer.close()
        await writer.wait_closed()
        return elapsed

    async def rtts_us(self, rounds: int) -> list[float]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(b"e")
        out = []
        message = b"x" * 64
        for _ in range(rounds):
            start = time.perf_counter()
            writer.write(message)
            await reader.readexactly(64)
            out.append((time.perf_counter() - start) * 1e6)
        writer.close()
        return out

    async def transfer(self, payload: bytes) -> tuple[float, float]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        cpu_start = time.process_time() + process_cpu_s(self.server_pid)
        start = time.perf_counter()
        writer.write(b"s")
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        reply = await reader.read()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() + process_cpu_s(self.server_pid) - cpu_start
        assert int(reply) == len(payload), f"sink counted {reply!r}"
        writer.close()
        return len(payload) / elapsed / 1e6, cpu


@contextlib.asynccontextmanager
async def server_process(argv: list[str]) -> AsyncIterator[tuple[str, int]]:
    """Start a variant's server; yields (its address, its pid); stops it by closing its stdin."""
    server = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(server.stdout.readline(), SERVER_START_S)  # type: ignore[union-attr]
        yield json.loads(line)["addr"], server.pid
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(server.wait(), 10)
        except TimeoutError:
            server.kill()
            await server.wait()


async def bench_tcp_and_shoal(mib: int, repeats: int) -> dict[str, dict]:
    """Both variants' servers run at once and their measurements alternate, so a burst of load from
    other jobs hits both alike; each shoal transfer is paired with the tcp transfer just before it."""
    serve = [sys.executable, "-m", "bench.transport", "--serve"]
    payload = b"\0" * (mib * MIB)
    async with (
        server_process([*serve, "tcp"]) as (tcp_addr, tcp_pid),
        server_process([*serve, "shoal"]) as (shoal_addr, shoal_pid),
        TcpClient(tcp_addr, tcp_pid) as tcp,
        ShoalClient(shoal_addr, shoal_pid) as shoal,
    ):
        clients = {"tcp": tcp, "shoal": shoal}
        raw: dict[str, dict] = {
            k: {"connect_ms": [], "rtt_us": [], "rates": [], "cpu_s": 0.0} for k in clients
        }
        for _ in range(CONNECT_ROUNDS):
            for kind, client in clients.items():
                raw[kind]["connect_ms"].append(await client.connect_ms())
        for kind, client in clients.items():
            raw[kind]["rtt_us"] = await client.rtts_us(RTT_ROUNDS)
        for _ in range(repeats):
            for kind, client in clients.items():
                rate, cpu = await client.transfer(payload)
                raw[kind]["rates"].append(rate)
                raw[kind]["cpu_s"] += cpu
    return raw


async def bench_libp2p(addr: str, mib: int, repeats: int, server_pid: int) -> dict:
    connect_ms: list[float] = []
    rtt_us: list[float] = []
    rates: list[float] = []
    cpu = 0.0
    for _ in range(repeats):
        server_cpu = process_cpu_s(server_pid)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PEER_SCRIPT), "bench", addr, str(mib), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"py-libp2p bench client failed with exit code {proc.returncode}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        connect_ms += result["connect_ms"]
        rtt_us += result["rtt_us"]
        rates.append(result["throughput_mb_s"])
        # Server CPU over the whole client run (connects and pings included) overstates libp2p's
        # per-byte cost slightly; the client reports its CPU for the transfer alone.
        cpu += result["transfer_cpu_s"] + process_cpu_s(server_pid) - server_cpu
    return {"connect_ms": connect_ms, "rtt_us": rtt_us, "rates": rates, "cpu_s": cpu}


async def run_libp2p(mib: int, repeats: int) -> dict:
    async with server_process([sys.executable, str(PEER_SCRIPT), "serve"]) as (addr, pid):
        return await bench_libp2p(addr, mib, min(repeats, LIBP2P_REPEATS), pid)


async def main(args: argparse.Namespace) -> dict:
    have_libp2p = importlib.util.find_spec("libp2p") is not None
    if not have_libp2p:
        print("py-libp2p not installed: skipping its variant (pip install libp2p==0.8.1)", file=sys.stderr)
    async with asyncio.timeout(WALL_CLOCK_GUARD_S):
        print("running tcp and shoal, interleaved ...", file=sys.stderr, flush=True)
        raw = await bench_tcp_and_shoal(args.mib, args.repeats)
        if have_libp2p:
            print("running py-libp2p ...", file=sys.stderr, flush=True)
            raw["libp2p"] = await run_libp2p(args.mib, args.repeats)
    paired = [s / t for s, t in zip(raw["shoal"]["rates"], raw["tcp"]["rates"], strict=True)]
    throughput = {k: round(max(v["rates"]), 1) for k, v in raw.items()}
    result = {
        "throughput_mb_s": throughput,
        "rtt_us": {k: round(statistics.median(v["rtt_us"]), 1) for k, v in raw.items()},
        "connect_ms": {k: round(statistics.median(v["connect_ms"]), 2) for k, v in raw.items()},
        # Median over paired transfers (each shoal run against the tcp run just before it): robust to
        # load swings. The ratio of the two best runs is given beside it.
        "ratio_vs_tcp": round(statistics.median(paired), 3),
        "ratio_vs_tcp_best": round(throughput["shoal"] / throughput["tcp"], 3),
        "ratio_vs_libp2p": round(throughput["shoal"] / throughput["libp2p"], 2)
        if "libp2p" in throughput
        else None,
        # MB moved per CPU-second of sender and receiver together: stable on a loaded machine.
        "mb_per_cpu_s": {
            k: round(args.mib * MIB * args.repeats / v["cpu_s"] / 1e6, 1) for k, v in raw.items()
        },
        "all_throughput_mb_s": {k: [round(r, 1) for r in v["rates"]] for k, v in raw.items()},
        "connect_ms_p90": {
            k: round(sorted(v["connect_ms"])[int(0.9 * len(v["connect_ms"]))], 2) for k, v in raw.items()
        },
        "mib": args.mib,
        "note": "loopback, each server in its own process; on a shared machine wall-clock figures are noisy",
    }
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--mib", type=int, default=64, help="MiB per throughput transfer (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="throughput transfers per variant (default 5)")
    parser.add_argument("--serve", choices=["shoal", "tcp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve))
        return
    result = uvloop.run(main(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
