"""Small requests while a swap fills a home link: do they get through, and how long does the swap take?

    sudo python -m bench.link_control --rate 100mbit --rtt-ms 50 [--mb 20] [--swaps 3] [--code OLD_TREE]
        [--json PATH]

Two hosts, one in each of two network namespaces on a shaped, delayed segment (`bench.link_topology`:
tbf on each egress, RTT from the delay switch). The client connects, then `--swaps` times: it opens one
stream on which both hosts send `--mb` MB at once (a round's swap, both directions), and while that runs it
opens a fresh stream every 0.5 s for a 64-byte request and its answer (the status questions, run-state
messages and protocol answers a daemon sends beside a swap), each with a 20 s limit (the host's negotiation
deadline is 10 s: a request that waits longer is reset by it). The reader of the swap opens its window for
the whole transfer (`Stream.expect`) where the tree has it. Each tree's hosts run from that tree
(`--code`: the baseline, measured in the same invocation on the same segment). Reported per tree: the
swap's seconds and its link utilization (2 × bytes over 2 × the rate × seconds), the requests' round trips
(median, worst) and how many failed; with `--code`, the ratios of this tree to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.peer_runs import write_json

SWAP_PROTOCOL = "/bench/swap/1"
REQUEST_PROTOCOL = "/bench/request/1"
REQUEST_BYTES = 64
REQUEST_EVERY_S = 0.5
REQUEST_LIMIT_S = 20.0
WRITE_CHUNK = 1 << 20


async def _read_all(stream: Any, nbytes: int) -> None:
    expect = getattr(stream, "expect", None)  # an older tree has none
    if expect is not None:
        expect(nbytes)
    got = 0
    while got < nbytes:
        data = await stream.read(min(WRITE_CHUNK, nbytes - got))
        if not data:
            raise RuntimeError(f"the swap's stream ended after {got} of {nbytes} bytes")
        got += len(data)


async def _write_all(stream: Any, nbytes: int) -> None:
    body = memoryview(bytes(min(nbytes, WRITE_CHUNK)))
    sent = 0
    while sent < nbytes:
        part = body[: min(len(body), nbytes - sent)]
        await stream.write(part)
        sent += len(part)


def serve(address: str) -> None:
    """The partner: answers swaps (its own bytes back at once) and requests; stops when stdin closes."""
    import uvloop

    from shoal.transport.host import Host
    from shoal.transport.identity import generate_key

    async def swap(stream: Any) -> None:
        nbytes = int.from_bytes(await stream.readexactly(8), "big")
        await asyncio.gather(_read_all(stream, nbytes), _write_all(stream, nbytes))
        await stream.close()

    async def request(stream: Any) -> None:
        await stream.write(await stream.readexactly(REQUEST_BYTES))
        await stream.close()

    async def main() -> None:
        host = await Host.create(generate_key(), [f"/ip4/{address}/tcp/4870"])
        host.set_stream_handler(SWAP_PROTOCOL, swap)
        host.set_stream_handler(REQUEST_PROTOCOL, request)
        print(json.dumps({"addr": str(host.listen_addrs[0].with_peer_id(host.peer_id))}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await host.close()

    uvloop.run(main())


async def _request(host: Any, peer: Any) -> float | None:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_LIMIT_S):
            stream = await host.new_stream(peer, REQUEST_PROTOCOL)
            await stream.write(b"q" * REQUEST_BYTES)
            await stream.readexactly(REQUEST_BYTES)
            await stream.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
        print(f"  a request failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    except Exception as error:  # the tree's TransportError (a reset at the partner's negotiation deadline)
        print(f"  a request failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return time.perf_counter() - started


def client(addr: str, nbytes: int, swaps: int) -> None:
    """Connects, then swaps with requests beside each swap; prints the measures as one JSON line."""
    import uvloop

    from shoal.transport.host import Host
    from shoal.transport.identity import generate_key

    async def main() -> dict[str, Any]:
        host = await Host.create(generate_key())
        peer = await host.connect(addr)
        swap_s: list[float] = []
        request_s: list[float | None] = []
        for index in range(swaps + 1):  # the first warms the path (TCP, the congestion window): not kept
            stream = await host.new_stream(peer, SWAP_PROTOCOL)
            started = time.perf_counter()
            await stream.write(nbytes.to_bytes(8, "big"))
            swap = asyncio.ensure_future(
                asyncio.gather(_read_all(stream, nbytes), _write_all(stream, nbytes))
            )
            times: list[float | None] = []
            while not swap.done():
                asking = asyncio.ensure_future(_request(host, peer))
                await asyncio.wait({swap, asking}, return_when=asyncio.FIRST_COMPLETED)
                times.append(await asking)
                if not swap.done():
                    await asyncio.wait({swap}, timeout=REQUEST_EVERY_S)
            await swap
            elapsed = time.perf_counter() - started
            await stream.close()
            if index:
                swap_s.append(round(elapsed, 3))
                request_s.extend(None if t is None else round(t, 3) for t in times)
            await asyncio.sleep(2.0)
        await host.close()
        return {"swap_s": swap_s, "request_s": request_s}

    print(json.dumps(uvloop.run(main())), flush=True)


def summarize(raw: dict[str, Any], nbytes: int, rate_bytes_s: float) -> dict[str, Any]:
    answered = [t for t in raw["request_s"] if t is not None]
    swap = statistics.median(raw["swap_s"])
    return {
        **raw,
        "swap_s_median": round(swap, 3),
        "link_utilization": round(2 * nbytes / (2 * rate_bytes_s * swap), 3),
        "requests": len(raw["request_s"]),
        "requests_failed": len(raw["request_s"]) - len(answered),
        "request_s_median": round(statistics.median(answered), 3) if answered else None,
        "request_s_max": round(max(answered), 3) if answered else None,
    }


def measure(args: argparse.Namespace, code: Path | None) -> dict[str, Any]:
    from bench.link_topology import Segment
    from bench.peer_runs import REPO_ROOT, tree_env

    env = tree_env(code)
    nbytes = int(args.mb * 1e6)
    here = str(Path(__file__).resolve())
    with Segment(2, args.rate, args.rtt_ms) as segment:
        server = segment.spawn(
            segment.namespaces[1], [sys.executable, here, "--serve", segment.addresses[1]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=code or REPO_ROOT,
        )  # fmt: skip
        assert server.stdout is not None and server.stdin is not None
        addr = json.loads(server.stdout.readline())["addr"]
        run = segment.spawn(
            segment.namespaces[0], [sys.executable, here, "--client", addr, str(nbytes), str(args.swaps)],
            stdout=subprocess.PIPE, text=True, env=env, cwd=code or REPO_ROOT,
        )  # fmt: skip
        assert run.stdout is not None
        line = run.stdout.readline()
        server.stdin.close()
        if not line:
            raise RuntimeError("the client printed nothing (see its errors above)")
        raw = json.loads(line)
    from bench.link_matrix import rate_bytes_per_s

    return summarize(raw, nbytes, rate_bytes_per_s(args.rate))


def show(name: str, result: dict[str, Any]) -> None:
    print(
        f"{name:10s} swap {result['swap_s_median']:.3f} s (link {result['link_utilization']:.3f})  requests: "
        f"median {result['request_s_median']} s, worst {result['request_s_max']} s, "
        f"failed {result['requests_failed']} of {result['requests']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="tbf rate on each egress (100mbit)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="RTT between the hosts (50)")
    parser.add_argument("--mb", type=float, default=20.0, help="MB each way per swap (20)")
    parser.add_argument("--swaps", type=int, default=3, help="swaps measured, after one to warm up (3)")
    parser.add_argument("--code", help="another checkout to measure in the same invocation: the baseline")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.client:
        addr, nbytes, swaps = args.client
        client(addr, int(nbytes), int(swaps))
        return
    result: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in ("rate", "rtt_ms", "mb", "swaps", "code")}
    }
    result["this"] = measure(args, None)
    show("this tree", result["this"])
    if args.code:
        from bench.peer_runs import parse_code

        result["baseline"] = measure(args, parse_code([args.code], "bench.link_control")[0])
        show("baseline", result["baseline"])
        this, base = result["this"], result["baseline"]
        result["swap_s_ratio"] = round(this["swap_s_median"] / base["swap_s_median"], 3)
        if this["request_s_median"] and base["request_s_median"]:
            result["request_s_median_ratio"] = round(this["request_s_median"] / base["request_s_median"], 3)
        print(f"this tree / baseline: swap {result['swap_s_ratio']}, request median "
              f"{result.get('request_s_median_ratio')}")  # fmt: skip
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
