"""A burst of creations must not take the mesh down (zmesh issue 14, defect 4), through real node processes.

As filed: 1,500 actors created at once with SPREAD on 3 nodes made the origin stop
answering for seconds; workers gave up their hello, peers declared nodes dead, and
hundreds of actors died. Here a smaller burst runs on 3 nodes whose failure detection
is shortened so that a node silent for about a second is declared dead: every actor
must answer, no member may ever be declared dead (or learn that it was), and the
origin's loop must report no stall.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import zmesh
from zmesh.exceptions import ZmeshError
from zmesh.testing import LocalCluster

# Large enough that the old node stalled for seconds (it forked every worker at once and rebuilt
# every actor's gossip row each round), small enough for a 2-core CI machine: about 30 s here.
BURST = 600
# A member silent for 0.8-1.6 s is declared dead (LocalCluster's fast timings, spelled out).
DETECTION = {"probe_interval_s": 0.1, "probe_timeout_s": 0.08, "suspicion_min_s": 0.8, "suspicion_max_s": 1.6}
# The longest the origin's loop may wake late: with the timings above, a stall of a second is a false death.
MAX_LAG_MS = 500
# The longest one turn of its loop may take (it answers nothing meanwhile); about 50 ms here, 200-300 ms before the fix.
MAX_BUSY_MS = 1000
# What a node logs when it holds a member dead, or learns that the others buried it (node/mesh/link.py).
DEATHS = (" is DEAD", "declared this node dead")


@zmesh.remote
class Member:
    def node(self) -> str:
        return str(zmesh.get_runtime_context().get_node_id())


def _deaths(cluster: LocalCluster, since: list[int]) -> list[str]:
    """Death and burial lines the nodes logged after ``since`` (lengths of their output)."""
    lines = []
    for i, node in enumerate(cluster.nodes):
        text = node.output_so_far()[since[i] :]
        lines += [f"node {i}: {line}" for line in text.splitlines() if any(d in line for d in DEATHS)]
    return lines


def _answers(refs: list[Any], timeout: float) -> tuple[list[str], Counter[str]]:
    """The values of the refs that answered, and the errors of the others by type."""
    ready, pending = zmesh.wait(refs, num_returns=len(refs), timeout=timeout)
    values, errors = [], Counter({"no answer": len(pending)} if pending else {})
    for ref in ready:
        try:
            values.append(zmesh.get(ref, timeout=5))
        except ZmeshError as exc:
            errors[type(exc).__name__] += 1
    return values, errors


@pytest.mark.timeout(120)
def test_a_burst_of_spread_creations_answers_and_declares_no_member_dead() -> None:
    with LocalCluster(nodes=3, config=DETECTION) as cluster:
        ids = [cluster.node_id(i) for i in range(3)]
        cluster.connect(0)
        since = [len(node.output_so_far()) for node in cluster.nodes]
        handles = [Member.options(scheduling_strategy="SPREAD").remote() for _ in range(BURST)]
        values, errors = _answers([h.node.remote() for h in handles], timeout=75)
        deaths = _deaths(cluster, since)
        status = cluster.status(0, timeout=30)
        assert not deaths, "members declared dead during the burst:\n" + "\n".join(deaths[:10])
        assert not errors and len(values) == BURST, f"{len(values)} of {BURST} actors answered; the others: {dict(errors)}"
        per_node = Counter(values)
        assert set(per_node) == set(ids) and min(per_node.values()) >= BURST // 6, f"not spread: {per_node}"
        lag, busy = status["loop_lag_ms"], status["loop_busy_ms"]
        assert lag["max"] < MAX_LAG_MS, f"the origin's loop woke up to {lag['max']:.0f} ms late: {lag}"
        assert busy["max"] < MAX_BUSY_MS, f"a turn of the origin's loop took {busy['max']:.0f} ms: {busy}"
