"""Three real peers (each a daemon process with its own worker process) train one model over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from gossip.runstate import public_bytes
from gossip.runstate import store as runstate_store
from peer.worker.model import GPT, PRESETS
from peer.worker.presets import peer_number
from transport.identity import load_key_file

from .conftest import REPO

ROUNDS = 5


def replica_spread(weights: list[list[torch.Tensor]]) -> float:
    """RMS distance of each replica's weights from the replicas' mean (research notes, P16)."""
    flat = torch.stack([torch.cat([t.reshape(-1) for t in replica]) for replica in weights])
    return (flat - flat.mean(dim=0)).pow(2).mean().sqrt().item()


def initial_weights(run_id: str, peer_id: str, model: str) -> list[torch.Tensor]:
    torch.manual_seed(peer_number(f"{run_id}/{peer_id}", 2**31))  # as the daemon seeds its worker
    return [p.detach().clone() for p in GPT(PRESETS[model]).parameters()]


def test_three_peers_learn_and_their_replicas_converge(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer",
            "swarm",
            "--peers",
            "3",
            "--run",
            "e2e",
            "--rounds",
            str(ROUNDS),
            "--inner-steps",
            "10",
            "--dir",
            str(tmp_path / "swarm"),
            "--json",
            str(summary_path),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Summary" in result.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["peers"] == 3 and summary["rounds"] == ROUNDS
    assert summary["eval_loss_end"] < 0.8 * summary["eval_loss_start"], summary

    peers = summary["per_peer"]
    assert all(p["rounds_done"] == ROUNDS for p in peers), peers
    # With three peers one sits out each round; the other two swap.
    assert sum(p["rounds_swapped"] for p in peers) >= ROUNDS, peers
    assert summary["bytes_per_peer_per_round"] > 0

    start = [initial_weights("e2e", p["peer"], "tiny") for p in peers]
    end = [torch.load(tmp_path / "swarm" / f"peer-{i}" / "checkpoint.pt")["slow"] for i in range(3)]
    spread_start, spread_end = replica_spread(start), replica_spread(end)
    print(f"replica spread: start {spread_start:.5f}, end {spread_end:.5f}")
    # Each peer starts from its own random init; pairwise averaging pulls the replicas together.
    # (Trained apart, they would drift further from each other than they started.)
    assert spread_end < 0.7 * spread_start, (spread_start, spread_end)

    # The run's signed CRDT state spread by gossip: every peer holds the creator's config and all members.
    creator = public_bytes(load_key_file(tmp_path / "swarm" / "peer-0" / "key"))
    for index in range(3):
        folder = tmp_path / "swarm" / f"peer-{index}"
        key = load_key_file(folder / "key")
        state = runstate_store.load(folder / "runstate", key, b"e2e", creator, time.time())
        assert state.config().get("run") == "e2e", (index, state.config())
        members = state.members(time.time())
        assert len(members) == 3 and all(m.round >= 1 for m in members), (index, members)
