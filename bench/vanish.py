"""A peer vanishes from a fast run: do the others stay in step and keep swapping?

Starts `--peers` real `peer join` processes on 127.0.0.1 (nano model, a few inner steps: rounds of a
fraction of a second), lets them swap for `--before` seconds, then makes one vanish: `kill` (SIGKILL, its
connections are refused at once), `freeze` (SIGSTOP, as a machine that lost its network: connections
hang until deadlines pass) or `term` (a clean stop that announces it leaves). The membership keeps a
silent peer for `--fail-after` seconds, as the compose swarm does (30 s).

Printed and written to `--json`: the survivors' share of swapped rounds before the loss (the baseline,
same run) and in the last `--tail` seconds of the `--after` window, their ratio, and how far apart the
survivors' rounds ended up. Until the round clock (gossip/rounds/clock.py), one survivor could run
ahead for good and every round it paired with someone was refused ("round N is too far ahead").

    python -m bench.vanish --vanish freeze --json bench/out/vanish.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIGNALS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "term": signal.SIGTERM}
START_TIMEOUT_S = 300


class Peer:
    def __init__(self, name: str, folder: Path, args: list[str]):
        self.name = name
        self.events_path = folder / f"{name}.jsonl"
        self.seen: list[tuple[float, dict]] = []  # (local time first seen, round event)
        with open(self.events_path, "wb") as out, open(folder / f"{name}.log", "wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "shoal.peer",
                    "join",
                    "--json-events",
                    *args,
                    "--state-dir",
                    str(folder / name),
                ],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=dict(os.environ),
            )

    def events(self, kind: str) -> list[dict]:
        found = []
        for line in self.events_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            if event.get("event") == kind:
                found.append(event)
        return found

    def poll(self, now: float) -> None:
        """Notes the round events that arrived since the last poll (events carry no wall clock)."""
        self.seen += [(now, r) for r in self.events("round")[len(self.seen) :]]

    def stop(self) -> None:
        """A clean stop (the worker saves and exits with its daemon); a kill if that takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen peer must run to hear SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(timeout=30)


def swapped_share(rounds: list[dict]) -> float | None:
    return round(sum(r["outcome"] == "swapped" for r in rounds) / len(rounds), 3) if rounds else None


def run(options: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="shoal-vanish-"))
    (folder / "peer.toml").write_text(f"[peer]\nfail_after = {options.fail_after}\n")
    common = ["--run", "vanish", "--listen", "127.0.0.1:0", "--model", "nano", "--inner-steps",
              str(options.inner_steps), "--batch-size", "4", "--threads", "1", "--exchange-timeout", "20",
              "--config", str(folder / "peer.toml"), "--wait-peers", str(options.peers)]  # fmt: skip
    peers = [Peer("p0", folder, common)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (listening := peers[0].events("listening")):
            if time.monotonic() > deadline or peers[0].process.poll() is not None:
                raise SystemExit(f"the first peer did not start; see {folder}/p0.log")
            time.sleep(0.2)
        address = listening[0]["address"]
        peers += [Peer(f"p{i}", folder, [*common, "--bootstrap", address]) for i in range(1, options.peers)]

        def poll() -> float:
            now = time.monotonic()
            for peer in peers:
                peer.poll(now)
            return now

        while not all(any(r["outcome"] == "swapped" for _, r in p.seen) for p in peers):
            if poll() > deadline:
                raise SystemExit(f"not every peer swapped within {START_TIMEOUT_S} s; see {folder}")
            time.sleep(0.5)
        started = poll()
        while poll() - started < options.before:
            time.sleep(0.5)
        victim, survivors = peers[1], [peers[0], *peers[2:]]
        vanished = poll()
        victim.process.send_signal(SIGNALS[options.vanish])
        while poll() - vanished < options.after:
            time.sleep(0.5)

        def window(peer: Peer, start: float, end: float) -> list[dict]:
            return [r for t, r in peer.seen if start <= t < end]

        before = [r for p in survivors for r in window(p, started, vanished)]
        tail = [
            r
            for p in survivors
            for r in window(p, vanished + options.after - options.tail, vanished + options.after)
        ]
        after = [r for p in survivors for r in window(p, vanished, vanished + options.after)]
        last = {p.name: p.seen[-1][1]["round"] for p in survivors if p.seen}
        skips = collections.Counter(
            re.sub(r"\d+", "N", re.sub(r"12D3\w+", "PEER", r["outcome"]))[:90]
            for r in after
            if r["outcome"] != "swapped"
        )
        share_before, share_tail = swapped_share(before), swapped_share(tail)
        return {
            "vanish": options.vanish,
            "peers": options.peers,
            "inner_steps": options.inner_steps,
            "fail_after_s": options.fail_after,
            "before_s": options.before,
            "after_s": options.after,
            "tail_s": options.tail,
            "rounds_before": len(before),
            "swapped_share_before": share_before,
            "rounds_after": len(after),
            "swapped_share_after": swapped_share(after),
            "rounds_tail": len(tail),
            "swapped_share_tail": share_tail,
            "ratio_tail_vs_before": round(share_tail / share_before, 3)
            if share_before and share_tail is not None
            else None,
            "last_round_spread": max(last.values()) - min(last.values()) if last else None,
            "last_rounds": last,
            "skips_after": dict(skips.most_common(8)),
            "logs": str(folder),
        }
    finally:
        for peer in peers:
            peer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vanish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=4)
    parser.add_argument("--vanish", choices=sorted(SIGNALS), default="freeze")
    parser.add_argument(
        "--fail-after", type=float, default=30.0, help="seconds before a silent peer is dropped"
    )
    parser.add_argument("--before", type=float, default=20.0, help="seconds of swapping measured before")
    parser.add_argument("--after", type=float, default=90.0, help="seconds measured after the peer vanished")
    parser.add_argument(
        "--tail", type=float, default=20.0, help="the last seconds of --after, measured apart"
    )
    parser.add_argument("--json", help="write the result here")
    options = parser.parse_args()
    result = run(options)
    print(
        f"{options.vanish} 1 of {options.peers} peers: survivors swapped {result['swapped_share_before']} of"
        f" their rounds before, {result['swapped_share_tail']} in the last {options.tail:.0f} s of"
        f" {options.after:.0f} s after (ratio {result['ratio_tail_vs_before']});"
        f" their last rounds {result['last_round_spread']} apart"
    )
    print("skips after:", json.dumps(result["skips_after"]))
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
