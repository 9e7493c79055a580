"""Prometheus names by the conventions, and the Grafana dashboard queries only names the daemon exports."""

from __future__ import annotations

import json
import re

from shoal.peer.metrics import METRICS, exposition, series_names
from shoal.peer.status import StatusBoard

from .conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "shoal-dashboard.json"
NAME = re.compile(r"^shoal_[a-z][a-z0-9_]*$")
UNITS = ("_seconds", "_bytes")


def test_names_follow_the_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for metric in METRICS:
        assert NAME.match(metric.name), metric.name
        assert metric.kind in ("gauge", "counter", "summary"), metric
        assert (metric.kind == "counter") == metric.name.endswith("_total"), metric.name  # counters only
        assert metric.kind != "summary" or metric.name.endswith(UNITS), metric.name
        assert "bytes" not in metric.name or "_bytes" in metric.name, metric.name  # the unit, spelled out
        assert metric.help.endswith("."), metric.name


def test_exposition_has_help_and_type_for_each_family_and_labels_on_every_sample():
    board = StatusBoard("12D3KooWPeer", "watch")
    fields = {"round": 3, "partner": "12D3KooWOther", "outcome": "swapped", "bytes_sent": 100,
              "bytes_received": 120, "seconds": 1.5, "inner_step": 60, "train_loss": 2.5}  # fmt: skip
    board.on_event("round", fields)
    board.on_event("eval", {"round": 3, "eval_loss": 2.75})
    status = {**board.snapshot(), "peers_known": 2, "peers_live": 2, "bans": ["12D3KooWBad"]}
    text = exposition(status)
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            families[line.split()[2]] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in families
            families[name] = kind
        else:
            name, value = line.split(" ")
            family = name.split("{")[0]
            assert family in series_names(), family
            assert name.endswith('{peer="12D3KooWPeer",run="watch"}'), name
            float(value)
    assert families["shoal_rounds_total"] == "counter" and families["shoal_eval_loss"] == "gauge"
    for sample in (
        'shoal_rounds_total{peer="12D3KooWPeer",run="watch"} 1.0',
        'shoal_sent_bytes_total{peer="12D3KooWPeer",run="watch"} 100.0',
        'shoal_received_bytes_total{peer="12D3KooWPeer",run="watch"} 120.0',
        'shoal_exchange_duration_seconds_sum{peer="12D3KooWPeer",run="watch"} 1.5',
        'shoal_exchange_duration_seconds_count{peer="12D3KooWPeer",run="watch"} 1.0',
        'shoal_eval_loss{peer="12D3KooWPeer",run="watch"} 2.75',
        'shoal_partners{peer="12D3KooWPeer",run="watch"} 1.0',
        'shoal_banned_peers{peer="12D3KooWPeer",run="watch"} 1.0',
    ):
        assert sample in text.splitlines(), sample


def _queries(node):
    """Every PromQL text in a dashboard: panel targets' `expr`, and the template variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield value if isinstance(value, str) else value.get("query", "")
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def test_the_grafana_dashboard_queries_only_metrics_the_daemon_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {name for text in _queries(dashboard) for name in re.findall(r"\bshoal_[a-z0-9_]+", text)}
    assert len(exprs) >= 10 and queried
    assert queried <= series_names(), queried - series_names()
    # loss, rounds, bytes, round time and partners all have a panel
    for wanted in ("shoal_eval_loss", "shoal_rounds_total", "shoal_sent_bytes_total",
                   "shoal_exchange_duration_seconds_sum", "shoal_partners"):  # fmt: skip
        assert wanted in queried, wanted
