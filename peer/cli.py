"""The `peer` command line: join a run, start a local swarm."""

from __future__ import annotations

import asyncio
import signal
import sys
import traceback

import click

from shoal.errors import ShoalError
from shoal.peer.config import ConfigError, load_config, parse_shard


def _setup_logging(verbose: bool, as_json: bool = False) -> None:
    """Text log lines on stderr, or with --log-json JSON objects only on stderr and stdout, the worker's
    included (peer/logs.py)."""
    from shoal.peer import logs

    logs.setup(verbose, as_json)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Shoal: train one model with peers anywhere, by swapping updates with one partner at a time.

    Start a run with `peer join --run NAME`, join it from elsewhere with the `--bootstrap` address it
    prints, or try everything on one machine with `peer swarm --peers 4`.
    """


@main.command(short_help="Join a run (or start one) and train with its peers.")
@click.option("--run", "run_id", required=False, help="The run to join (or start): letters, digits, . _ -")
@click.option(
    "--bootstrap",
    multiple=True,
    metavar="MULTIADDR",
    help="Address of any Shoal peer, e.g. /ip4/1.2.3.4/tcp/4701/p2p/ID (the run's peers are found through "
    "the DHT). Repeatable. Without one, this peer starts the run and prints the address others join with.",
)
@click.option(
    "--listen",
    default=None,
    metavar="ADDR",
    help="Where to accept peers: /ip4/HOST/tcp/PORT or HOST:PORT. Default /ip4/0.0.0.0/tcp/0 (any port).",
)
@click.option(
    "--data",
    default=None,
    metavar="PATH",
    help="A UTF-8 text file, a folder of them, a quoted glob ('texts/*.txt'), nanoGPT token files (a folder "
    "with train.bin/val.bin, or one .bin), or a Hugging Face dataset saved with save_to_disk (needs "
    "`pip install shoal[datasets]`). Default: the Python standard library's sources.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A TOML file whose [peer] table sets any option below; the command line wins.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="The peer's key, checkpoint and control socket. Default ./runs/RUN/PEER-ID.",
)
@click.option(
    "--rounds", type=int, default=None, help="Stop after this many outer rounds (default: run until stopped)."
)
@click.option(
    "--wait-peers",
    type=int,
    default=None,
    help="Start training once this many peers (self included) are ready, or after 60 s.",
)
@click.option(
    "--model",
    default=None,
    help="Model: nano, tiny (default), small, base, gpt2-small, or hf:PATH (a Hugging Face LM in a folder).",
)
@click.option("--inner-steps", type=int, default=None, help="Inner AdamW steps per round (H). Default 20.")
@click.option("--batch-size", type=int, default=None, help="Sequences per inner step. Default 16.")
@click.option("--lr", type=float, default=None, help="Peak inner learning rate. Default 3e-3.")
@click.option(
    "--shard", default=None, metavar="INDEX/COUNT", help="Train on this shard of the data, e.g. 0/4."
)
@click.option(
    "--method",
    default=None,
    help="Outer method: default (the convergence benchmark's choice), compressed-noloco, noloco, "
    "pair-sparseloco. Every peer of a run must use the same one.",
)
@click.option(
    "--exchange-timeout", type=float, default=None, help="Seconds to wait for a partner each round."
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads for the worker's torch (default: torch's)."
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False),
    default=None,
    help="The peer's key file (from `peer keygen`). Default: DIR/key in --state-dir, else a new key.",
)
@click.option(
    "--relay",
    "relays",
    multiple=True,
    metavar="MULTIADDR",
    help="A relay to reserve a slot on when this peer is behind a NAT (a public peer started with "
    "--serve-relay); /p2p/ID may be left out. Repeatable. Without one, a peer that finds itself behind a "
    "NAT reserves on its bootstrap peers if they relay.",
)
@click.option(
    "--stun",
    multiple=True,
    metavar="HOST:PORT",
    help="A STUN server for hole punching (e.g. a public peer started with --serve-stun). Repeatable; two "
    "at different addresses tell a symmetric NAT apart.",
)
@click.option(
    "--turn", multiple=True, metavar="HOST:PORT:USER:PASSWORD", help="A TURN server for ICE. Repeatable."
)
@click.option("--serve-relay", is_flag=True, default=None, help="Relay for NATed peers (public peers).")
@click.option("--serve-stun", type=int, default=None, metavar="PORT", help="Answer STUN on this port.")
@click.option("--no-punch", "no_punch", is_flag=True, help="Keep relayed paths; never try to punch a hole.")
@click.option(
    "--closed",
    is_flag=True,
    default=None,
    help="Start a closed run: only peers with a join token from you (`peer token`) may enter.",
)
@click.option(
    "--token",
    default=None,
    envvar="SHOAL_TOKEN",
    metavar="TOKEN",
    help="Your join token for a closed run, from its creator's `peer token` (or set SHOAL_TOKEN).",
)
@click.option(
    "--identity-bits",
    type=int,
    default=None,
    envvar="SHOAL_IDENTITY_BITS",
    help="Bits of work each member's identity proves, the same on every peer of the run (default 20: a "
    "second or two once per key; makes identities cost something to mint).",
)
@click.option(
    "--overlap/--no-overlap",
    default=None,
    help="Train the next round while this one is swapped: no time lost to the link, for the partner's part "
    "of each outer step landing a round late (0.5-1.3 % higher loss per token in the benchmark). Default: "
    "on its own while a round's swap (2 MiB payloads and up) takes a quarter of its training time and 1 s.",
)
@click.option(
    "--activation-checkpointing",
    type=click.Choice(["auto", "on", "off"]),
    default=None,
    help="Recompute each layer's activations during backward instead of keeping them: less memory for "
    "about a quarter more compute. auto (default): where one micro-batch's activations would exceed the "
    "model and half a GiB (gpt2-small: about 700 MB less per worker).",
)
@click.option("--json-events", is_flag=True, help="Print one JSON object per event on stdout (for tools).")
@click.option(
    "--metrics", default=None, metavar="HOST:PORT", help="Serve Prometheus metrics here (off by default)."
)
@click.option("--log-json", is_flag=True, help="Write log lines as JSON objects.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="On a failure, print the full traceback (the worker's too).")
@click.option("--behave", default=None, hidden=True, help="Test only: play a hostile partner (an attack).")
def join(
    run_id,
    bootstrap,
    listen,
    data,
    config_file,
    state_dir,
    rounds,
    wait_peers,
    model,
    inner_steps,
    batch_size,
    lr,
    shard,
    method,
    exchange_timeout,
    threads,
    key,
    relays,
    stun,
    turn,
    serve_relay,
    serve_stun,
    no_punch,
    closed,
    token,
    identity_bits,
    overlap,
    activation_checkpointing,
    json_events,
    metrics,
    log_json,
    verbose,
    debug,
    behave,
) -> None:
    """Join the run RUN (or start it) and train with its peers until stopped (Ctrl-C)."""
    _setup_logging(verbose, log_json)
    try:
        config = load_config(
            config_file,
            {
                "run_id": run_id,
                "bootstrap": tuple(bootstrap),
                "listen": listen,
                "data": data,
                "state_dir": state_dir,
                "rounds": rounds,
                "wait_peers": wait_peers,
                "model": model,
                "inner_steps": inner_steps,
                "batch_size": batch_size,
                "lr": lr,
                "shard": parse_shard(shard) if shard else None,
                "exchange_timeout": exchange_timeout,
                "method": method,
                "threads": threads,
                "metrics": metrics,
                "key": key,
                "relays": tuple(relays),
                "stun": tuple(stun),
                "turn": tuple(turn),
                "serve_relay": serve_relay,
                "serve_stun": serve_stun,
                "punch": False if no_punch else None,
                "closed": closed,
                "token": token,
                "identity_bits": identity_bits,
                "overlap": None if overlap is None else ("on" if overlap else "off"),
                "activation_checkpointing": activation_checkpointing,
                "behave": behave,
            },
        )
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    sys.exit(_run_daemon(config, json_events, debug))


def _run_daemon(config, json_events: bool, debug: bool = False) -> int:
    """Runs the daemon; a failure ends in one line on stderr (the cause and what to do) and exit code 1,
    the traceback only with --debug."""
    import uvloop

    from shoal.peer.daemon import Daemon

    daemon: Daemon | None = None

    async def run(daemon: Daemon) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.stop)
        return await daemon.run()

    try:
        daemon = Daemon(config, json_events=json_events)
        return uvloop.run(run(daemon))
    except KeyboardInterrupt:  # before the daemon's own handler was installed
        return 130
    except Exception as error:  # the task group's ExceptionGroup included
        for line in failure_lines(error, debug):
            click.echo(f"Error: {line}", err=True)
        if json_events and daemon is not None:  # for `peer swarm` and other tools reading the events
            daemon.events.emit("error", message=" / ".join(failure_lines(error, False)))
        return 1


def failure_lines(error: BaseException, debug: bool) -> list[str]:
    """What a failed daemon prints: the message of each ShoalError in `error` (an ExceptionGroup from the
    daemon's task group, possibly nested), or one line saying that anything else is a bug. With `debug`
    the tracebacks go to stderr first, the training worker's included."""
    leaves = list(_leaf_exceptions(error))
    known = [leaf for leaf in leaves if isinstance(leaf, ShoalError)]
    if debug:
        traceback.print_exception(error, file=sys.stderr)
        for leaf in known:
            if details := getattr(leaf, "details", ""):
                print(f"The training worker's traceback:\n{details.rstrip()}", file=sys.stderr)
    if known:
        return list(dict.fromkeys(str(leaf) for leaf in known))
    first = leaves[0] if leaves else error
    hint = "" if debug else " (run the same command with --debug to see the traceback)"
    return [
        f"unexpected {type(first).__name__}: {str(first)[:300]}; "
        f"this is a bug in Shoal, please report it{hint}"
    ]


def _leaf_exceptions(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaf_exceptions(inner)
    else:
        yield error


@main.command(short_help="Run N peers on this machine with a live table and a summary.")
@click.option(
    "--peers",
    "peer_count",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="How many peer processes to start on 127.0.0.1.",
)
@click.option("--run", "run_id", default="swarm", show_default=True, help="Run id of the local swarm.")
@click.option(
    "--rounds", type=click.IntRange(1), default=15, show_default=True, help="Outer rounds to train."
)
@click.option(
    "--inner-steps", type=click.IntRange(1), default=20, show_default=True, help="Inner steps per round."
)
@click.option("--model", default="tiny", show_default=True, help="Model size (nano, tiny, small, ...).")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the summary as JSON to this file.",
)
@click.option(
    "--dir",
    "swarm_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where peers write logs and checkpoints. Default ./runs/RUN.",
)
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads per worker.")
@click.option("--debug", is_flag=True, help="Peers write the full traceback of a failure to their logs.")
@click.option(
    "--behave",
    "behaviours",
    multiple=True,
    hidden=True,
    metavar="INDEX:ATTACK",
    help="Test only: peer INDEX plays a hostile partner (the live Byzantine benchmark). Repeatable.",
)
def swarm(
    peer_count, run_id, rounds, inner_steps, model, json_path, swarm_dir, threads, debug, behaviours
) -> None:
    """Start PEERS real `peer join` processes on this machine and show them training together.

    The first peer starts the run and the others join through it. A live table shows each peer's
    round, losses, partner and traffic; at the end a summary table (and --json) reports eval loss at
    start and end, rounds done, bytes sent per peer per round and wall time. Ctrl-C stops them all.
    """
    from shoal.peer.swarm import SwarmOptions, run_swarm

    behave: dict[int, str] = {}
    for item in behaviours:
        index, _, attack = item.partition(":")
        if not index.isdigit() or not attack or int(index) >= peer_count:
            raise click.UsageError(f"--behave {item!r} must be INDEX:ATTACK with INDEX < --peers")
        behave[int(index)] = attack
    options = SwarmOptions(
        peer_count, run_id, rounds, inner_steps, model, json_path, swarm_dir, threads, debug, behave
    )
    sys.exit(run_swarm(options))


_state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="The peer's state directory (holds control.sock). Default: the only running peer under ./runs.",
)  # fmt: skip
_run_option = click.option(
    "--run", "run_id", default=None, help="Look for the peer of this run under ./runs."
)


def _control_socket(state_dir: str | None, run_id: str | None):
    from shoal.peer.control import ControlError, find_socket

    try:
        return find_socket(state_dir, run_id)
    except ControlError as error:
        raise click.ClickException(str(error)) from error


@main.command(short_help="One screen on a running peer: round, losses, partner, traffic, peers.")
@_state_dir_option
@_run_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--wide", is_flag=True, help="Full peer ids (else short prefixes that fit the terminal).")
def status(state_dir, run_id, as_json, wide) -> None:
    """Show what a running peer is doing: identity and addresses, run and round, inner step and throughput,
    train/eval loss, current partner and path, bytes per round, bits per parameter, peers known and live,
    bans, what it is waiting for, and its last error; then the command others join its run with."""
    from shoal.peer.control import ControlError
    from shoal.peer.repl import show_status

    path = _control_socket(state_dir, run_id)
    try:
        sys.exit(asyncio.run(show_status(path, as_json, wide)))
    except ControlError as error:
        raise click.ClickException(str(error)) from error


@main.command(short_help="An interactive prompt on a running peer.")
@_state_dir_option
@_run_option
def repl(state_dir, run_id) -> None:
    """Open an interactive prompt on a running peer (completion and history). Commands: status, peers,
    links, rounds [N], loss [N], config, dht, state, why, log [N], ban PEER, unban PEER, wide, help, quit."""
    from shoal.peer.control import ControlError
    from shoal.peer.repl import repl as run_repl

    path = _control_socket(state_dir, run_id)
    try:
        sys.exit(asyncio.run(run_repl(path)))
    except ControlError as error:
        raise click.ClickException(str(error)) from error


@main.command(short_help="Create a peer identity key file (readable by its owner only).")
@click.argument("path", type=click.Path(dir_okay=False), default="peer.key")
@click.option("--force", is_flag=True, help="Overwrite an existing key file (the old identity is lost).")
def keygen(path, force) -> None:
    """Write a new Ed25519 identity key to PATH (default ./peer.key, mode 0600) and print its peer id.
    Use it with `peer join --key PATH`."""
    from shoal.transport.identity import generate_key, peer_id_from_key, write_key_file

    key = generate_key()
    try:
        write_key_file(path, key, overwrite=force)
    except ShoalError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {path}; peer id {peer_id_from_key(key)}")


@main.command(short_help="Issue a join token for a closed run (run by the run's creator).")
@click.option("--run", "run_id", required=True, help="The closed run the token admits to.")
@click.option("--for", "subject", default=None, metavar="PEER_ID", help="The peer id the token admits.")
@click.option("--any", "anyone", is_flag=True, help="Admit whoever holds the token (keep it secret).")
@click.option(
    "--expires", default="30d", show_default=True, metavar="DURATION",
    help="How long the token admits its holder: e.g. 12h, 30d, 3600s.",
)  # fmt: skip
@click.option("--key", default=None, type=click.Path(dir_okay=False), help="The creator's key file.")
@click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="The creator's state directory (its key file is DIR/key). Default: the only one under ./runs/RUN.",
)  # fmt: skip
def token(run_id, subject, anyone, expires, key, state_dir) -> None:
    """Print a join token, signed with the run creator's key, that admits one peer (--for ID: the peer id
    it printed when it started, or from `peer keygen`) or anyone who holds it (--any) to the closed run RUN
    (started with `peer join --closed`). The peer joins with `peer join --run RUN --token TOKEN ...`."""
    import time

    from shoal.gossip.admission import ANYONE, issue
    from shoal.peer.tokens import TokenCommandError, find_creator_key, parse_duration
    from shoal.transport.identity import PeerID

    if bool(subject) == anyone:
        raise click.UsageError("pass exactly one of --for PEER_ID and --any")
    try:
        seconds = parse_duration(expires)
        if subject:
            PeerID.from_string(subject)  # a ValueError that names what is wrong with it
        creator_key, where = find_creator_key(run_id, key, state_dir)
        issued = issue(creator_key, run_id, ANYONE if anyone else subject, int(time.time() + seconds))
    except ValueError as error:  # a --for that is not a peer id
        raise click.UsageError(str(error)) from error
    except (TokenCommandError, ShoalError) as error:
        raise click.ClickException(str(error)) from error
    whom = "anyone who holds it" if anyone else subject
    click.echo(
        f"join token for {whom} in run {run_id}, signed with {where} (peer {issued.creator}), valid for "
        f"{expires}:",
        err=True,
    )
    click.echo(issued.text())
