"""Which settings make two peers' replicas one run, and the one line that says what differs.

A peer that joins a run with another method, model, schedule or corpus would fetch the run's weights,
train, and then have every partner refuse its messages, for ever. So a joiner compares its settings with
what the members say of theirs (in membership swaps) before it fetches any weight, and stops with one
line that names the setting and what to pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from shoal.peer.config import PeerConfig

# The settings that make two peers' replicas one run: what they train (model, corpus), how (method, inner
# steps and optimizer), resolved by the worker. A peer's own --data path, shard, batch size, threads and
# --rounds are its business.
RUN_SETTINGS = ("model", "method", "inner_steps", "lr", "warmup_steps", "weight_decay", "corpus_sha256")
SETTING_OPTIONS = {
    "model": "--model",
    "method": "--method",
    "inner_steps": "--inner-steps",
    "lr": "--lr",
    "warmup_steps": "warmup_steps (config file)",
    "weight_decay": "weight_decay (config file)",
}


def run_settings(config: PeerConfig, hello: dict[str, Any]) -> dict[str, Any]:
    """This peer's run settings, from its config and its worker's hello (the resolved method, the corpus)."""
    from_config = {name: getattr(config, name) for name in RUN_SETTINGS if name in SETTING_OPTIONS}
    return {**from_config, "method": str(hello["method"]), "corpus_sha256": str(hello["corpus_sha256"])}


def valid_settings(settings: object) -> TypeGuard[dict[str, Any]]:
    return (
        isinstance(settings, dict)
        and set(settings) == set(RUN_SETTINGS)
        and all(isinstance(v, (str, int, float)) and len(str(v)) < 256 for v in settings.values())
    )


def settings_mismatch(mine: dict[str, Any], run: dict[str, Any]) -> str:
    """'' when `mine` trains what the run trains; else what differs and what to pass instead."""
    for name in RUN_SETTINGS:
        if mine.get(name) == run.get(name):
            continue
        if name == "corpus_sha256":
            return (
                f"its members train on a corpus with sha256 {str(run[name])[:12]}…, this peer's is "
                f"{str(mine[name])[:12]}…; give it the run's data with --data (without --data the corpus is "
                "this Python's standard library, which differs between Python versions)"
            )
        return (
            f"it trains with {name.replace('_', ' ')} {run[name]!r}, this peer with {mine[name]!r}; "
            f"join with {SETTING_OPTIONS[name]} {run[name]}"
        )
    return ""
