"""Does a daemon's transport give back the memory a flood of idle streams took? Attack it again and again.

    python -m bench.stream_memory [--identities 32] [--streams 64] [--attacks 6] [--json PATH]

A victim Host (this process) serves a protocol whose handler waits for a request that never comes. Each
attack is a separate process: `--identities` fresh identities connect and each opens `--streams` idle
streams, holds them 2 s, and closes. After each attack the victim collects garbage and gives freed heap back
(`malloc_trim`, as the Host does every few seconds), and its resident set is read from /proc. A leak grows
the resident set with every attack; an allocator's high-water mark grows over the first attacks and then
stays. tracemalloc, started after the second attack, counts the Python objects allocated since then that
are still alive after the last: bytes that something still holds.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import sys
import tracemalloc
from pathlib import Path

import uvloop

from shoal.transport.errors import TransportError
from shoal.transport.host import Host, Stream
from shoal.transport.identity import generate_key

PROTOCOL = "/bench/idle/1"
HANDLER_WAIT_S = 60.0

ATTACKER = """
import asyncio, sys
import uvloop
from shoal.transport.host import Host, Stream
from shoal.transport.identity import generate_key

async def main(addr, identities, streams):
    hosts = [await Host.create(generate_key(), []) for _ in range(identities)]
    held = []
    for host in hosts:
        peer = await host.connect(addr)
        for _ in range(streams):
            try:
                held.append(await host.new_stream(peer, "PROTOCOL"))
            except Exception:  # a cap refused it: that is the victim defending itself
                pass
    print(len(held), flush=True)
    await asyncio.sleep(2)
    for host in hosts:
        await host.close()

uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""".replace("PROTOCOL", PROTOCOL)


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def give_back() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


async def run(args: argparse.Namespace) -> dict:
    victim = await Host.create(generate_key(), ["/ip4/127.0.0.1/tcp/0"])

    async def idle(stream: Stream) -> None:
        try:
            async with asyncio.timeout(HANDLER_WAIT_S):
                await stream.read()
        except (TimeoutError, OSError, TransportError):  # any end of the stream ends the wait
            pass

    victim.set_stream_handler(PROTOCOL, idle)
    addr = f"{victim.listen_addrs[0]}/p2p/{victim.peer_id}"
    rows, reference = [], None
    try:
        for attack in range(args.attacks):
            give_back()
            before = resident_mb()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", ATTACKER, addr, str(args.identities), str(args.streams),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            await asyncio.sleep(2)  # the victim sees the connections go
            give_back()
            after = resident_mb()
            held = int(out.decode().strip() or 0)
            rows.append({"attack": attack, "streams": held, "rss_before_mb": round(before, 1),
                         "rss_after_mb": round(after, 1), "kept_mb": round(after - before, 1)})  # fmt: skip
            print(f"attack {attack}: {held} idle streams; resident {before:.1f} -> {after:.1f} MB "
                  f"({after - before:+.1f})", flush=True)  # fmt: skip
            if attack == 1:  # traced from here on: the first attacks' resident figures carry no tracing cost
                tracemalloc.start(1)
                reference = tracemalloc.take_snapshot()
        python_growth = None
        if reference is not None:
            diff = tracemalloc.take_snapshot().compare_to(reference, "filename")
            python_growth = sum(d.size_diff for d in diff) / 1024 / 1024
            print(f"Python objects alive after attack {args.attacks - 1} minus after attack 1: "
                  f"{python_growth:+.2f} MB", flush=True)  # fmt: skip
    finally:
        await victim.close()
    return {
        "identities": args.identities,
        "streams_per_identity": args.streams,
        "attacks": rows,
        "kept_after_first_mb": round(rows[0]["rss_after_mb"] - rows[0]["rss_before_mb"], 1),
        "kept_after_last_vs_second_mb": round(rows[-1]["rss_after_mb"] - rows[1]["rss_after_mb"], 1)
        if len(rows) > 1
        else None,
        "python_objects_growth_mb": None if python_growth is None else round(python_growth, 2),
    }


def main() -> None:
    about = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.stream_memory", description=about)
    parser.add_argument("--identities", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64, help="idle streams per identity (64)")
    parser.add_argument("--attacks", type=int, default=6)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.attacks < 2:
        parser.error("--attacks must be at least 2 (the comparison needs a second attack)")
    result = uvloop.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
