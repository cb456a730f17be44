#!/usr/bin/env python3
"""Writes pgquorum-dashboard.json (Grafana 9+) from the panel list below.

Kept as a generator so the panels stay readable and every query names a metric the
code exposes (docs/metrics.md); run it after editing: python3 make_dashboard.py
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, exprs, x, y, w=12, h=8, kind="timeseries", unit="short", legend=None, desc=""):
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": (legend or ["{{instance}}"] * len(exprs))[i]}
            for i, e in enumerate(exprs)
        ],
    }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background"}
    return p


SEL = 'cluster=~"$cluster"'
panels = [
    {"id": 100, "type": "row", "title": "Cluster", "collapsed": False, "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}, "panels": []},
    panel(1, "Writable primaries", [f'sum(pgquorum_keeper_role{{role="primary",{SEL}}})'], 0, 1, w=4, h=4, kind="stat", legend=["primaries"],
          desc="Must be 1. 0: no writes anywhere; 2: see the PgquorumTwoPrimaries alert."),
    panel(2, "Streaming standbys", [f'sum(pgquorum_keeper_role{{role="replica",{SEL}}})'], 4, 1, w=4, h=4, kind="stat", legend=["standbys"]),
    panel(3, "Monitor leader", [f'max(pgquorum_monitor_leader{{{SEL}}})'], 8, 1, w=4, h=4, kind="stat", legend=["leader id"],
          desc="Member id of the monitor group's leader (0 = none)."),
    panel(4, "Monitor term", [f'max(pgquorum_monitor_term{{{SEL}}})'], 12, 1, w=4, h=4, kind="stat", legend=["term"]),
    panel(5, "Monitor members up", [f'sum(up{{job="pgquorum-monitor",{SEL}}})'], 16, 1, w=4, h=4, kind="stat", legend=["up"]),
    panel(6, "Keepers up", [f'sum(up{{job="pgquorum-keeper",{SEL}}})'], 20, 1, w=4, h=4, kind="stat", legend=["up"]),
    {"id": 101, "type": "row", "title": "Nodes", "collapsed": False, "gridPos": {"x": 0, "y": 5, "w": 24, "h": 1}, "panels": []},
    panel(10, "Role by node", [f'pgquorum_keeper_role{{{SEL}}} == 1'], 0, 6, legend=["{{instance}} {{role}}"],
          desc="1 for the role each node has now: primary, replica, fenced, unknown."),
    panel(11, "Current state by node", [f'pgquorum_keeper_state{{kind="current",{SEL}}} == 1'], 12, 6, legend=["{{instance}} {{state}}"]),
    panel(12, "Replication lag", [f'pgquorum_keeper_replication_lag_bytes{{{SEL}}}'], 0, 14, unit="bytes"),
    panel(13, "WAL position (LSN)", [f'pgquorum_keeper_lsn_bytes{{{SEL}}}'], 12, 14, unit="bytes"),
    panel(14, "Primary lease left", [f'pgquorum_keeper_lease_remaining_seconds{{{SEL}}} and on (instance) pgquorum_keeper_role{{role="primary"}} == 1'], 0, 22, unit="s",
          desc="Renewed on every heartbeat; the primary refuses writes when it reaches 0."),
    panel(15, "Timeline", [f'pgquorum_keeper_timeline{{{SEL}}}'], 12, 22),
    panel(16, "Transitions / 5 min", [f'increase(pgquorum_keeper_transitions_total{{{SEL}}}[5m]) > 0'], 0, 30, legend=["{{instance}} to {{to}} {{result}}"]),
    panel(17, "Mean transition duration", [
        f'increase(pgquorum_keeper_transition_seconds_total{{{SEL}}}[15m]) / on (instance, to) sum by (instance, to) (increase(pgquorum_keeper_transitions_total{{{SEL}}}[15m]))'
    ], 12, 30, unit="s", legend=["{{instance}} to {{to}}"]),
    panel(18, "Fences, postgres restarts, heartbeat failures / 5 min", [
        f'increase(pgquorum_keeper_fences_total{{{SEL}}}[5m])',
        f'increase(pgquorum_keeper_postgres_restarts_total{{{SEL}}}[5m])',
        f'increase(pgquorum_keeper_heartbeat_failures_total{{{SEL}}}[5m])',
    ], 0, 38, w=24, legend=["{{instance}} fences", "{{instance}} postgres restarts", "{{instance}} heartbeat failures"]),
    {"id": 102, "type": "row", "title": "Monitor group", "collapsed": False, "gridPos": {"x": 0, "y": 46, "w": 24, "h": 1}, "panels": []},
    panel(20, "Committed and applied index", [
        f'pgquorum_monitor_committed_index{{{SEL}}}', f'pgquorum_monitor_applied_index{{{SEL}}}'
    ], 0, 47, legend=["member {{member}} committed", "member {{member}} applied"]),
    panel(21, "Members' lag behind the leader (entries)", [f'pgquorum_monitor_member_lag{{{SEL}}}'], 12, 47, legend=["peer {{peer}}"]),
    panel(22, "Leader per member", [f'pgquorum_monitor_is_leader{{{SEL}}}'], 0, 55, legend=["member {{member}}"]),
    panel(23, "Raft log writes / s", [f'deriv(pgquorum_monitor_last_log_index{{{SEL}}}[1m])'], 12, 55, unit="ops", legend=["member {{member}}"]),
]

dashboard = {
    "title": "pgquorum",
    "uid": "pgquorum",
    "tags": ["postgresql", "pgquorum"],
    "timezone": "browser",
    "schemaVersion": 38,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {
                "name": "cluster", "type": "query", "datasource": DS, "label": "Cluster",
                "query": "label_values(pgquorum_keeper_pg_up, cluster)", "includeAll": True,
                "allValue": ".*", "multi": False, "refresh": 2,
            },
        ]
    },
    "panels": panels,
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pgquorum-dashboard.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
