"""The training worker's main loop: a separate process that owns the model (and the GPU, when there is one).

It talks to its daemon over a control channel (stdin/stdout) and passes payloads through shared memory:
    daemon -> worker: start {settings, checkpoint path (resumed from when it exists)}
    worker -> daemon: hello {spec, shared-memory names, parameters, corpus hash}
    worker -> daemon: eval {round, eval_loss}; progress {round, inner_step, train_loss}
    worker -> daemon: payload {round, nbytes}         (our fast weights are in the outbound segment)
    daemon -> worker: partner {round, nbytes, peer, swap_seconds} | skip {round, reason}
    worker -> daemon: verdict {round, peer, action, reason, weight, scores, excluded, struck, strikes, why}
    worker -> daemon: snapshot {round, path, nbytes}  (φ after the round, in a file for joiners)
    daemon -> worker: stop                            (any time it trains or evaluates, or as the reply)
    worker -> daemon: done {round}                    (after the last round; also on a closed channel)
    worker -> daemon: error {message, bug, traceback}  (it cannot go on: bad data, a damaged checkpoint, ...)
The worker never touches the network: whatever the daemon hands it has already been validated, and is
validated again here before it touches the weights.

It checkpoints after every round, in the background (peer/worker/checkpoints.py), and when it stops. A stop
in the middle of a round saves the inner steps done so far as they are (fast weights, AdamW state, sampler)
with the outer state of the last finished round, so the checkpoint's round is that round and a resumed
worker takes only the rest of the next round's H inner steps before its outer step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.gossip.rounds import payload as dense
from shoal.peer import logs
from shoal.peer.ipc import ControlChannel, SharedBuffer
from shoal.peer.worker import overlap
from shoal.peer.worker.checkpoints import CheckpointWriter, resume
from shoal.peer.worker.memory import PhasePeaks
from shoal.peer.worker.snapshots import write_snapshot
from shoal.peer.worker.train import Interrupted, Trainer, TrainSettings

log = logging.getLogger("shoal.peer.worker")
PROGRESS_EVERY_S = 1.0
STOP_POLL_S = 0.05  # how often the running model looks for a stop request (a select() on the channel)
# Set by the daemon's `stop` (or its closing the channel), or by a SIGTERM sent to the worker itself
# (systemd and Docker signal every process of a service): the worker saves and exits.
STOP = threading.Event()
ERROR_MESSAGE_CHARS = 4000  # an error's one line, and its traceback (for --debug), within MAX_CONTROL_BYTES
ERROR_TRACEBACK_CHARS = 24000
# The resident set's peak in each phase of the round, sent with the round's `eval` event (`peak_mb`).
PEAKS = PhasePeaks()


def run(channel: ControlChannel) -> int:
    start = channel.receive()
    if start is None:  # the daemon stopped (or failed) before it needed us
        return 0
    if start.get("type") != "start":
        log.error("worker: expected a start message, got %r", start)
        return 2
    settings = TrainSettings.from_dict(start["settings"])
    checkpoint = Path(start["checkpoint"])
    trainer = Trainer(settings)
    if trainer.checkpointing:
        log.info("activation checkpointing on: each layer's activations are recomputed during backward")
    resume(trainer, checkpoint)  # where it stopped; a damaged checkpoint is set aside, the previous one used
    writer = CheckpointWriter(checkpoint)
    spec = trainer.spec()
    capacity = dense.max_payload_bytes(spec)  # a dense fp32 message bounds every method's
    outbound, inbound = SharedBuffer.create(capacity), SharedBuffer.create(capacity)
    try:
        channel.send(
            {
                "type": "hello",
                "spec": [[name, list(shape)] for name, shape in spec],
                "outbound": outbound.name,
                "inbound": inbound.name,
                "capacity": capacity,
                "parameters": trainer.parameter_count(),
                "corpus_sha256": trainer.corpus_sha256,
                "shard": list(trainer.shard),
                "round": trainer.round,
                "inner_step": trainer.inner_step,
                "method": trainer.outer_config.method,
                "lattice_bits": trainer.outer_config.lattice_bits,
            }
        )
        begin = channel.receive()
        if begin is None or begin.get("type") != "begin":
            return 0
        if begin.get("weights_nbytes"):  # a peer joining a run in progress starts from a member's weights
            trainer.adopt(inbound.read(int(begin["weights_nbytes"])), int(begin["round"]))
            log.info("starting from a member's weights of round %d", trainer.round)
        trainer.should_stop = _stop_poll(channel)
        try:
            channel.send({"type": "eval", "round": trainer.round, "eval_loss": trainer.evaluate()})
            return _train(channel, trainer, outbound, inbound, writer)
        except Interrupted:  # in an inner step (dropped: it never happened) or an evaluation (not needed)
            done, steps = trainer.round_steps, settings.inner_steps
            log.info("stopping in round %d after %d of %d inner steps", trainer.round + 1, done, steps)
            return _stop(channel, trainer, writer)
    finally:
        writer.close()  # no checkpoint thread outlives the worker
        for buffer in (outbound, inbound):
            buffer.close()


def _train(
    channel: ControlChannel,
    trainer: Trainer,
    outbound: SharedBuffer,
    inbound: SharedBuffer,
    writer: CheckpointWriter,
) -> int:
    settings = trainer.settings
    pending: overlap.Overlap | None = None  # an overlapped round, swapped while this one trains
    pending_number = 0
    policy = overlap.Policy(settings.overlap)
    try:
        while settings.rounds is None or trainer.round < settings.rounds:
            number = trainer.round + 1
            losses: list[float] = []
            last_report = time.monotonic()
            training = 0.0  # seconds in inner steps this round: what the round's wall time went to training
            # (fewer steps in a round resumed from a mid-round stop)
            full_round = trainer.round_steps == 0
            while trainer.round_steps < settings.inner_steps:
                began = time.monotonic()
                with PEAKS.phase("inner"):
                    losses.append(trainer.train_step())  # raises Interrupted on a stop request
                training += time.monotonic() - began
                if pending is not None and channel.answer_ready():
                    # Settled from here on: a stop during its evaluation is an ordinary mid-round stop.
                    settling, pending = pending, None
                    _settle(channel, trainer, inbound, writer, settling, pending_number, policy)
                    number = trainer.round + 1  # the daemon may have moved us on
                if time.monotonic() - last_report > PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    channel.send(
                        {
                            "type": "progress",
                            "round": number,
                            "inner_step": trainer.inner_step,
                            "train_loss": losses[-1],
                        }
                    )
            if pending is not None:  # the round trained faster than the last one swapped: wait for it
                settling, pending = pending, None
                _settle(channel, trainer, inbound, writer, settling, pending_number, policy)
                number = trainer.round + 1
            policy.note_training(training, full_round)
            with PEAKS.phase("message"):
                own = trainer.message()
                nbytes = outbound.write(trainer.outgoing(own))
            channel.send(
                {
                    "type": "payload",
                    "round": number,
                    "nbytes": nbytes,
                    "inner_step": trainer.inner_step,
                    "train_loss": sum(losses) / len(losses) if losses else None,
                    "train_seconds": round(training, 3),
                    "encode_seconds": round(trainer.seconds["encode"], 3),
                }
            )
            # While the daemon swaps, nothing changes the inner optimizer: its state goes to disk now, as it
            # is, for this round's checkpoint (no copy of it held while the next round trains).
            optimizer_file = writer.write_optimizer(trainer.optimizer.state_dict())
            if policy.next_round() and (settings.rounds is None or number < settings.rounds):
                with PEAKS.phase("overlap"):
                    spill = writer.path.parent / overlap.SPILL_NAME
                    pending, pending_number = overlap.begin(trainer, own, optimizer_file, spill), number
                channel.expecting_answer = True
                continue
            with PEAKS.phase("wait"):  # the optimizer's file is written meanwhile
                reply = channel.receive()
            if reply is None or reply.get("type") == "stop":
                # The message is made (sparse methods folded it into their error feedback): end the round as
                # one without a partner, as a skip would, so that the checkpoint holds a whole outer state.
                trainer.outer_step(own, None)
                log.info("stopping after round %d, ended without a partner", trainer.round)
                return _stop(channel, trainer, writer, optimizer_file)
            policy.note_answer(reply)
            # The daemon may move us to the run's round when we joined late or fell behind.
            number = max(number, int(reply.get("round", number)))
            partner = inbound.read(int(reply["nbytes"])) if reply.get("type") == "partner" else None
            trainer.round = number - 1
            trainer.inner_step = max(trainer.inner_step, number * settings.inner_steps)  # the run's schedule
            partner_id = reply.get("peer") if isinstance(reply.get("peer"), str) else None
            excluded_before = set(trainer.guard.excluded) if trainer.guard is not None else set()
            with PEAKS.phase("outer"):
                outcome = trainer.outer_step(own, partner, partner_id)
                # Every round, written while the next round trains; before anything is sent, so that a
                # daemon that dies now (a broken pipe below) still leaves this round saved.
                writer.write(trainer.state_dict(optimizer_file))
            _after_step(channel, trainer, writer, number, outcome, partner_id, excluded_before)
    except Interrupted:
        if pending is None:
            raise
        # Stopped before the swap's answer: the round ends as one without a partner, as without overlap.
        overlap.abandon(trainer, pending)
        log.info("stopping after round %d, ended without a partner (overlapped)", trainer.round)
        return _stop(channel, trainer, writer, pending.optimizer_file)
    writer.wait()  # the last round's checkpoint is the final one
    channel.send({"type": "done", "round": trainer.round, "checkpoint": str(writer.path)})
    return 0


def _settle(
    channel: ControlChannel,
    trainer: Trainer,
    inbound: SharedBuffer,
    writer: CheckpointWriter,
    pending: overlap.Overlap,
    number: int,
    policy: overlap.Policy,
) -> None:
    """An overlapped round's answer is in (or awaited now): its real outer step, its checkpoint and its
    reports, as `_train` does for a round without overlap. A stop instead of the answer raises Interrupted:
    the round stays the one taken alone, and the next round's steps so far are kept (a mid-round stop)."""
    with PEAKS.phase("wait"):
        reply = channel.receive()
    channel.expecting_answer = False
    if reply is None or reply.get("type") == "stop":
        raise Interrupted("stopped while the round was being swapped")
    policy.note_answer(reply)
    number = max(number, int(reply.get("round", number)))
    partner = inbound.read(int(reply["nbytes"])) if reply.get("type") == "partner" else None
    partner_id = reply.get("peer") if isinstance(reply.get("peer"), str) else None
    excluded_before = set(trainer.guard.excluded) if trainer.guard is not None else set()
    with PEAKS.phase("outer"):
        outcome = overlap.settle(trainer, pending, number, partner, partner_id)
        writer.write(overlap.round_start_state(trainer, pending))
    # How far the next round trained before this one's answer came: what overlap saved of the swap's time.
    ahead = {"overlapped_steps": trainer.round_steps}
    _after_step(channel, trainer, writer, number, outcome, partner_id, excluded_before, ahead)


def _after_step(
    channel: ControlChannel,
    trainer: Trainer,
    writer: CheckpointWriter,
    number: int,
    outcome: str,
    partner_id: str | None,
    excluded_before: set[str],
    about: dict[str, Any] | None = None,
) -> None:
    """What follows a round's outer step: its verdict, the snapshot a joiner may fetch, the evaluation
    (with `about`'s fields)."""
    if outcome.startswith("partner message refused"):
        log.warning("round %d: %s", number, outcome)
    if trainer.verdict is not None and partner_id is not None:
        channel.send(_verdict_message(trainer, number, partner_id, excluded_before))
    began = time.monotonic()
    with PEAKS.phase("snapshot"):
        path, nbytes = write_snapshot(writer.path.parent, trainer.round, trainer.slow_chunks())
    snapshot_seconds = time.monotonic() - began
    channel.send(
        {
            "type": "snapshot",
            "round": trainer.round,
            "path": str(path),
            "nbytes": nbytes,
        }
    )
    began = time.monotonic()
    with PEAKS.phase("eval"):
        loss = trainer.evaluate()
    # Where the round's time and memory went (bench.link reads these from the `eval` event): the peaks
    # are since the last round's evaluation, an overlapped round's inner steps included.
    seconds = {**trainer.seconds, "snapshot": snapshot_seconds, "eval": time.monotonic() - began}
    timing = {f"{name}_seconds": round(value, 3) for name, value in seconds.items() if name != "encode"}
    peaks = {"peak_mb": PEAKS.take()} if PEAKS.peaks else {}
    channel.send(
        {"type": "eval", "round": trainer.round, "eval_loss": loss, **timing, **peaks, **(about or {})}
    )


def _verdict_message(trainer: Trainer, number: int, peer: str, excluded_before: set[str]) -> dict:
    """The guard's verdict on this round's partner, for the daemon's log and events; `excluded` when this
    verdict excluded the partner here, `struck` when it was a strike: the daemon publishes both."""
    verdict = trainer.verdict
    assert verdict is not None and trainer.guard is not None
    return {
        "type": "verdict",
        "round": number,
        "peer": peer,
        "action": verdict.action,
        "reason": verdict.reason,
        "weight": round(verdict.weight, 4),
        "scores": {k: round(v, 4) for k, v in verdict.scores.items() if math.isfinite(v)},
        "excluded": peer in trainer.guard.excluded and peer not in excluded_before,
        "struck": verdict.strike,
        "strikes": len(trainer.guard.strikes.get(peer, [])),
        "why": trainer.guard.why.get(peer, ""),
    }


def _stop_poll(channel: ControlChannel) -> Callable[[], bool]:
    """Has a stop been asked for? Looks at the channel at most every STOP_POLL_S (the model calls this at
    every layer); a `stop` read off the channel is remembered. Only while the worker trains or evaluates:
    the daemon then sends nothing else."""
    last = 0.0

    def stop_requested() -> bool:
        nonlocal last
        now = time.monotonic()
        if not STOP.is_set() and now - last >= STOP_POLL_S:
            last = now
            if channel.stop_requested():
                STOP.set()
        return STOP.is_set()

    return stop_requested


def _stop(
    channel: ControlChannel, trainer: Trainer, writer: CheckpointWriter, optimizer_file: str | None = None
) -> int:
    """Saves the state as it is now (after the write in progress, if any) and tells the daemon.
    `optimizer_file`: the optimizer's state is already in that file (no inner step since it was written)."""
    writer.write(trainer.state_dict(optimizer_file), background=False)
    with contextlib.suppress(BrokenPipeError):  # a daemon that was killed closed the channel: nobody to tell
        channel.send({"type": "done", "round": trainer.round, "checkpoint": str(writer.path)})
    return 0


def main() -> int:
    # Ctrl-C reaches the whole process group; the daemon decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    if logs.json_mode():  # the daemon runs with --log-json: JSON objects only (it relays our stderr)
        logs.setup(verbose=False, as_json=True, stderr_logger="shoal.peer.worker")
    else:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    channel = ControlChannel.from_stdio()
    try:
        return run(channel)
    except BrokenPipeError:  # the daemon died (SIGKILL): nobody to tell; run() saved what it could
        log.warning("worker: the daemon is gone; stopping with the last round's checkpoint")
        return 1
    except Exception as error:  # told to the daemon, which prints one line (the traceback with --debug)
        return _report(channel, error)


def _report(channel: ControlChannel, error: Exception) -> int:
    """Sends the daemon the error that stops the worker: what happened and what to do, or (for an error
    nobody raised on purpose) that it is a bug; the traceback goes along for `peer join --debug`."""
    bug = False
    if isinstance(error, ShoalError):
        message = str(error)
    elif isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # CPU or CUDA
        what = (str(error).splitlines() or [type(error).__name__])[0][:200]
        message = f"the training worker ran out of memory ({what}); use a smaller --model or --batch-size"
    else:
        bug, message = True, f"{type(error).__name__}: {error}"
    report = {
        "type": "error",
        "message": message[:ERROR_MESSAGE_CHARS],
        "bug": bug,
        "traceback": traceback.format_exc()[-ERROR_TRACEBACK_CHARS:],
    }
    try:
        channel.send(report)
    except (OSError, ValueError):  # the daemon is gone: nobody else will say it
        log.error("worker: %s", message)
    return 1
