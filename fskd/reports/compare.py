"""Paired comparison of two evaluation reports (``fskd compare A.json B.json``).

Two methods evaluated on the same store with the same episodes (same way, shots, query, episode
count, split and seed) or the same all-way seeds are paired: the difference is taken per episode
or per seed, and its mean gets a 95% CI by the same rule as the accuracies (normal approximation
over episodes, Student t over seeds). A pair that is not the same experiment is refused, naming
what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from fskd.errors import ConfigError
from fskd.evaluation.metrics import paired_difference
from fskd.fsutil import read_small_file

#: result fields that must agree for two reports to be paired
PAIRED = {
    "episodic": ("store_fingerprint", "split", "way", "shots", "query", "episodes", "seed"),
    "allway": ("store_fingerprint", "shots", "seeds"),
}


def read_report(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"report {p} does not exist (write one with fskd eval --report DIR)")
    try:
        data = json.loads(read_small_file(p, "report", what="JSON report written by fskd eval --report"))
        return data["result"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise ConfigError(f"{p} is not an fskd evaluation report ({type(e).__name__}: {e})") from None


def compare_reports(a_path: str | Path, b_path: str | Path) -> dict:
    """``{a, b, difference, ci95, excludes_zero, n, statistic, protocol, ...}``: A minus B, percent."""
    a, b = read_report(a_path), read_report(b_path)
    if a.get("protocol") != b.get("protocol"):
        raise ConfigError(
            f"{a_path} is a {a.get('protocol')} result and {b_path} a {b.get('protocol')} one; "
            f"only the same protocol can be paired"
        )
    protocol = a["protocol"]
    diff = [k for k in PAIRED[protocol] if a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(
            "the two reports are not the same experiment, so they cannot be paired: they differ in "
            + ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in diff)
        )
    if protocol == "episodic":
        if not a.get("per_episode") or not b.get("per_episode"):
            raise ConfigError("these reports hold no per-episode accuracies (written by an older fskd); evaluate again")
        d = paired_difference(a["per_episode"], b["per_episode"], "episodes")
    else:
        d = paired_difference([x / 100 for x in a["per_seed"]], [x / 100 for x in b["per_seed"]], "seeds")
    name = lambda r: r.get("state") or r.get("classifier")  # noqa: E731
    return {
        "protocol": protocol,
        "a": name(a),
        "b": name(b),
        "a_accuracy": a["accuracy"],
        "b_accuracy": b["accuracy"],
        **d,
        "store": a.get("store"),
    }
