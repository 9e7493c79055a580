"""`peer status` and the REPL at 80 columns: short unique peer ids, tables that fit, the join line whole."""

from __future__ import annotations

import io
import time

from rich.console import Console

from shoal.peer.repl import (
    join_command,
    peer_ids_in,
    render,
    render_status,
    short_ids,
)
from shoal.transport.identity import generate_key, peer_id_from_key

IDS = sorted(str(peer_id_from_key(generate_key())) for _ in range(12))
ME, PARTNER, BANNED = IDS[0], IDS[1], IDS[2]
ADDRESS = f"/ip4/203.0.113.200/tcp/47010/p2p/{ME}"


def screen(draw, width: int = 80, wide: bool = False) -> list[str]:
    out = io.StringIO()
    draw(Console(file=out, width=width), wide)
    return out.getvalue().splitlines()


def assert_fits(lines: list[str], width: int = 80) -> None:
    long = [line for line in lines if len(line) > width and not line.startswith("peer join ")]
    assert not long, "\n".join(long)
    assert not any("…" in line for line in lines), "\n".join(lines)  # nothing cut off


def peers() -> list[dict]:
    return [
        {
            "peer_id": p,
            "address": f"/ip4/198.51.100.{n}/tcp/4701/p2p/{p}",
            "addresses": [f"/ip4/198.51.100.{n}/tcp/4701/p2p/{p}"],
            "live": True,
            "left": False,
            "finished_round": 1200 + n,
            "heard_s_ago": 0.4,
            "banned": p == BANNED,
            "self": p == ME,
        }
        for n, p in enumerate(IDS)
    ]


def status() -> dict:
    return {
        "peer_id": ME, "run": "watch", "address": ADDRESS, "round": 12, "inner_step": 240,
        "reachability": f"not checked (no relay, no bootstrap peer to dial it back): others dial {ADDRESS}",
        "inner_steps_per_s": 3.2, "train_loss": 2.31, "eval_loss": 2.52, "partner": PARTNER, "path": "direct",
        "bytes_sent_per_round": 1234567.0, "bytes_received_per_round": 1234567.0, "bits_per_param": 3.02,
        "rounds_done": 12, "rounds_swapped": 10, "peers_known": 12, "peers_live": 12, "bans": [BANNED],
        "activity": "training", "why": f"Fetching the run's weights from {PARTNER}: 1.0 of 4.0 MB (3s).",
        "last_error": f"12:00:01 round 11: no answer from {IDS[3]} within 30 s",
    }  # fmt: skip


def test_short_ids_skip_the_ed25519_prefix_and_grow_only_where_two_ids_share_more():
    names = short_ids(IDS)
    assert all(len(n) == 8 and p.startswith("12D3KooW" + n) for p, n in names.items())
    assert len(set(names.values())) == len(IDS)
    twins = ["12D3KooWAbcdefghXYZ1", "12D3KooWAbcdefghXYq2", "12D3KooWZzzz9999aaaa", "QmAbcdefgh123456789"]
    assert short_ids(twins) == {
        twins[0]: "AbcdefghXYZ",  # shares "AbcdefghXY" with the next: one character more than that
        twins[1]: "AbcdefghXYq",
        twins[2]: "Zzzz9999",
        twins[3]: "QmAbcdef",  # not an Ed25519 id: its own first characters
    }


def test_peer_ids_are_found_in_addresses_sentences_and_lists_but_prefixes_are_not_ids():
    found = peer_ids_in({"a": [ADDRESS], "b": f"no answer from {PARTNER}.", "c": ME[:12], "d": IDS[3][:40]})
    assert found == {ME, PARTNER}


def test_every_list_fits_80_columns_with_unique_short_ids():
    lines = screen(lambda console, wide: render(console, "peers", peers(), wide))
    assert_fits(lines)
    text = "\n".join(lines)
    names = short_ids(IDS)
    for peer in IDS:
        assert names[peer] in text and peer not in text
    assert "`wide` shows them" in text  # the columns left out are named

    rounds = [
        {"at": time.time(), "round": 12, "partner": PARTNER, "outcome": f"skipped: no answer from {PARTNER}",
         "bytes_sent": 1234567, "bytes_received": 7654321, "inner_step": 240, "train_loss": 2.345,
         "seconds": 30.01, "bits_per_param": 3.02},
    ] * 5  # fmt: skip
    links = [
        {"partner": PARTNER, "path": "relayed", "path_reason": "both peers are behind symmetric NATs",
         "rtt_ms": 41.2, "payload_mb_s": 1.25, "exchanges": 3, "last_outcome": "swapped",
         "last_exchange_s_ago": 12.5, "last_exchange_s": 4.2},
    ]  # fmt: skip
    config = {"run_id": "watch", "bootstrap": [ADDRESS, ADDRESS], "data": "/home/volunteer/" + "x" * 120}
    log = [f"2026-01-01 12:00:00,000 INFO shoal.peer.daemon: [{ME}] joined run watch through {ADDRESS}"]
    for command, result in (("rounds", rounds), ("links", links), ("config", config), ("log", log)):
        lines = screen(lambda console, wide, c=command, r=result: render(console, c, r, wide))
        assert_fits(lines)
        assert PARTNER not in "\n".join(lines) and ME not in "\n".join(lines), command


def test_status_fits_80_columns_and_prints_the_join_command_whole_on_its_own_line():
    lines = screen(lambda console, wide: render_status(console, status(), wide))
    assert_fits(lines)
    join = [line for line in lines if line.startswith("peer join ")]
    assert join == [f"peer join --run watch --bootstrap {ADDRESS}"] == [join_command(status())]
    text = "\n".join(lines)
    names = short_ids([ME, PARTNER, BANNED, IDS[3]])
    for peer in (PARTNER, BANNED, IDS[3]):
        assert names[peer] in text and peer not in text
    assert text.count(ME) == 1  # in the join command only


def test_wide_shows_full_ids_and_every_column():
    text = "\n".join(screen(lambda console, wide: render(console, "peers", peers(), wide), wide=True))
    assert all(peer in text for peer in IDS) and "addresses" in text and "left" in text
    text = "\n".join(screen(lambda console, wide: render_status(console, status(), wide), wide=True))
    assert PARTNER in text and BANNED in text and ME in text
