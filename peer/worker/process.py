"""The training worker's main loop: a separate process that owns the model (and the GPU, when there is one).

It talks to its daemon over a control channel (stdin/stdout) and passes payloads through shared memory:
    daemon -> worker: start {settings, checkpoint path (resumed from when it exists)}
    worker -> daemon: hello {spec, shared-memory names, parameters, corpus hash}
    worker -> daemon: eval {round, eval_loss}; progress {round, inner_step, train_loss}
    worker -> daemon: payload {round, nbytes}         (our fast weights are in the outbound segment)
    daemon -> worker: partner {round, nbytes} | skip {round, reason}
    worker -> daemon: done {round}                    (after the last round; also on a closed channel)
    worker -> daemon: error {message, bug, traceback}  (it cannot go on: bad data, a damaged checkpoint, ...)
The worker never touches the network: whatever the daemon hands it has already been validated, and is
validated again here before it touches the weights.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import traceback
from pathlib import Path

from shoal.errors import ShoalError
from shoal.gossip.rounds import payload as dense
from shoal.peer import logs
from shoal.peer.ipc import ControlChannel, SharedBuffer
from shoal.peer.worker.train import Trainer, TrainSettings

log = logging.getLogger("shoal.peer.worker")
PROGRESS_EVERY_S = 1.0
CHECKPOINT_EVERY = 10  # rounds; and always when the worker stops
ERROR_MESSAGE_CHARS = 4000  # an error's one line, and its traceback (for --debug), within MAX_CONTROL_BYTES
ERROR_TRACEBACK_CHARS = 24000


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
    if checkpoint.exists():
        trainer.load(checkpoint)  # a restarted peer continues exactly where it stopped
        log.info("resumed from %s at round %d", checkpoint, trainer.round)
    spec = trainer.spec()
    capacity = dense.max_payload_bytes(spec)  # a dense fp32 message bounds every method's
    outbound, inbound = SharedBuffer.create(capacity), SharedBuffer.create(capacity)
    snapshot = SharedBuffer.create(4 * trainer.parameter_count())  # phi, for peers that join the run
    try:
        channel.send(
            {
                "type": "hello",
                "spec": [[name, list(shape)] for name, shape in spec],
                "outbound": outbound.name,
                "inbound": inbound.name,
                "snapshot": snapshot.name,
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
        channel.send({"type": "eval", "round": trainer.round, "eval_loss": trainer.evaluate()})
        return _train(channel, trainer, outbound, inbound, snapshot, checkpoint)
    finally:
        for buffer in (outbound, inbound, snapshot):
            buffer.close()


def _train(
    channel,
    trainer: Trainer,
    outbound: SharedBuffer,
    inbound: SharedBuffer,
    snapshot: SharedBuffer,
    checkpoint: Path,
) -> int:
    settings = trainer.settings
    while settings.rounds is None or trainer.round < settings.rounds:
        number = trainer.round + 1
        losses: list[float] = []
        last_report = time.monotonic()
        for _ in range(settings.inner_steps):
            if channel.stop_requested():  # stop now, not after the round's remaining inner steps
                log.info("stopping in round %d after %d inner steps", number, len(losses))
                trainer.save(checkpoint)
                channel.send({"type": "done", "round": trainer.round, "checkpoint": str(checkpoint)})
                return 0
            losses.append(trainer.train_step())
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
        own = trainer.message()
        nbytes = outbound.write(own)
        channel.send(
            {
                "type": "payload",
                "round": number,
                "nbytes": nbytes,
                "inner_step": trainer.inner_step,
                "train_loss": sum(losses) / len(losses),
            }
        )
        reply = channel.receive()
        if reply is None or reply.get("type") == "stop":
            break
        # The daemon may move us to the run's round when we joined late or fell behind.
        number = max(number, int(reply.get("round", number)))
        partner = inbound.read(int(reply["nbytes"])) if reply.get("type") == "partner" else None
        trainer.round = number - 1
        trainer.inner_step = max(trainer.inner_step, number * settings.inner_steps)  # the run's schedule
        outcome = trainer.outer_step(own, partner)
        if outcome.startswith("partner message refused"):
            log.warning("round %d: %s", number, outcome)
        channel.send(
            {"type": "snapshot", "round": trainer.round, "nbytes": snapshot.write(trainer.slow_bytes())}
        )
        channel.send({"type": "eval", "round": trainer.round, "eval_loss": trainer.evaluate()})
        if trainer.round % CHECKPOINT_EVERY == 0:
            trainer.save(checkpoint)
    trainer.save(checkpoint)
    channel.send({"type": "done", "round": trainer.round, "checkpoint": str(checkpoint)})
    return 0


def main() -> int:
    # Ctrl-C reaches the whole process group; the daemon decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if logs.json_mode():  # the daemon runs with --log-json: JSON objects only (it relays our stderr)
        logs.setup(verbose=False, as_json=True, stderr_logger="shoal.peer.worker")
    else:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    channel = ControlChannel.from_stdio()
    try:
        return run(channel)
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
