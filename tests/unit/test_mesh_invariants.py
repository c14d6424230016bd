"""The mesh's invariants on a simulated mesh: the real pure cores, a fake clock, and histories drawn by hypothesis.

Each history (creations named or not, with get_if_exists, restartable or not, with node affinity; kills;
lookups from every node; joins; deaths alone and two together; freezes and thaws; partitions and heals;
message drops, duplicates and delays) runs on a fresh simulated mesh (``tests/sim/``), and every invariant
of ``tests/sim/invariants.py`` is checked after every 0.1 s of simulated time. Pure: no sockets, no sleeps.

CI runs the fixed histories below and drawn ones from a fixed seed. ``make sim MINUTES=N`` (the
``ZMESH_SIM_MINUTES`` variable) draws fresh ones for N minutes and prints the shrunk failing history as a
``play(...)`` call. Two bugs of the membership core found here (a node frozen past its detection never
learned it was buried; a node cut off alone buried the whole mesh when it rejoined) are plain regression
tests below; drawn histories tolerate nothing.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, note, seed, settings
from hypothesis import strategies as st
from sim.history import Create, Die, Freeze, Join, Kill, Lookup, MessageFaults, Op, Partition, Pick, Together, Wait, play

SIM_MINUTES = float(os.environ.get("ZMESH_SIM_MINUTES") or 0)
TIMEOUT = 0 if SIM_MINUTES else 120
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
PHASES = (Phase.explicit, Phase.generate, Phase.shrink)  # no explain phase: it traces every replay, slowly

picks = st.builds(Pick, st.sampled_from(["node", "host", "keeper"]), st.integers(0, 9), st.integers(0, 2))
victims = st.lists(picks, min_size=1, max_size=2).map(tuple)
creations = st.builds(
    Create,
    node=st.integers(0, 9),
    name=st.none() | st.integers(0, 2),
    get_if_exists=st.booleans(),
    restartable=st.booleans(),
    affinity=st.none() | st.none() | picks,
    soft=st.booleans(),
)
kills = st.builds(Kill, actor=st.integers(0, 20), node=st.integers(0, 9))
waits = st.builds(Wait, seconds=st.sampled_from([0.1, 0.5, 2.0, 6.0, 12.0]))
operations: st.SearchStrategy[Op] = st.one_of(
    creations,
    creations,
    st.builds(Together, st.lists(creations, min_size=2, max_size=3).map(tuple)),
    kills,
    st.builds(Lookup, name=st.integers(0, 2)),
    waits,
    waits,
    st.builds(Join, after=st.sampled_from([0.0, 0.2])),
    st.builds(Die, victims=victims),
    st.builds(Freeze, victims=victims, seconds=st.sampled_from([0.5, 1.5, 3.0, 6.0])),
    st.builds(Partition, side=st.lists(picks, min_size=1, max_size=3).map(tuple), seconds=st.sampled_from([1.0, 4.0, 8.0])),
    st.builds(MessageFaults, drop=st.sampled_from([0.0, 0.05, 0.3]), dup=st.sampled_from([0.0, 0.2]), seconds=st.sampled_from([1.0, 4.0])),
)
histories = st.lists(operations, min_size=1, max_size=25)


@st.composite
def death_histories(draw: Any) -> list[Op]:
    """Rounds of creations, a settle, then one node or two dying together: what (d) is about."""
    history: list[Op] = []
    for _ in range(draw(st.integers(1, 3))):
        history += draw(st.lists(st.one_of(creations, kills), min_size=1, max_size=6))
        history += [Wait(10.0), Die(draw(victims)), Wait(2.0)]
        history += draw(st.lists(st.one_of(creations, kills, st.just(Join())), max_size=3))
    return history


MET: collections.Counter[str] = collections.Counter()  # histories played, and known bugs met, for the summary


def check_history(history: list[Op], sim_seed: int) -> None:
    note(f"play({history!r}, seed={sim_seed})")
    world = play(history, seed=sim_seed)
    MET["histories"] += 1
    MET.update({bug for bug, _, _ in world.checker.excused})


def check_deaths(history: list[Op], sim_seed: int) -> None:
    note(f"play({history!r}, seed={sim_seed})")
    play(history, seed=sim_seed)


# Histories that exercise each invariant on purpose (and catch the mutants of test_mesh_invariants_mutants.py).
NAMED_TWICE: list[Op] = [
    Together((Create(0, 0, True, False), Create(1, 0, True, True), Create(2, 0, False, False))),
    Create(3, 0, True, False),
    Wait(3.0),
    Lookup(0),
]
KILL_AND_RECLAIM: list[Op] = [Create(0, 1, False, True), Wait(2.0), Kill(0, 2), Wait(3.0), Create(3, 1, True, False), Wait(2.0), Lookup(1)]
# The host of a restartable actor dies with its first keeper; later, with two newcomers, another host with its last.
HOST_AND_KEEPER_DIE: list[Op] = [
    Create(1, None, False, True),
    Create(2, 2, False, True),
    Wait(12.0),
    Die((Pick("host", 0), Pick("keeper", 0, 0))),
    Wait(10.0),
    Join(),
    Join(),
    Wait(12.0),
    Die((Pick("host", 1), Pick("keeper", 1, 2))),
]
HOLDER_DIES: list[Op] = [Create(0, 2, False, False), Wait(10.0), Die((Pick("host", 0),)), Wait(12.0), Lookup(2)]
SHORT_FREEZE: list[Op] = [
    Create(0, 0, False, True),
    Create(1, 1, False, False),
    Wait(10.0),
    Freeze((Pick("host", 0), Pick("host", 1)), 1.5),
]
AFFINITY_TO_A_NEWCOMER: list[Op] = [Join(after=0.0), Create(0, None, False, False, Pick("node", 5), False), Wait(2.0)]
# The first keeper freezes just as the host dies: it reads the host's DEAD when it thaws, before gossip shows that
# the second keeper (which saw both dead) made the actor again; both act, at incarnations 16 and 17, and 16 stops.
KEEPER_FROZEN_AS_HOST_DIES: list[Op] = [
    Create(0, None, False, True),
    Wait(10.0),
    Die((Pick("host", 0),)),
    Wait(1.3),
    Freeze((Pick("keeper", 0, 0),), 4.0),
]
# A node holding a named actor is cut off: the rest bury it, and it stops the actor when it learns so (it buries the
# rest too, see ISOLATED_NODE_BURIES_THE_MESH; they host only actors that may die with their node here).
PARTITIONED_HOLDER: list[Op] = [Create(0, 0, False, False), Create(1, None, False, False), Wait(10.0), Partition((Pick("host", 0),), 8.0)]
FAULTY_NETWORK: list[Op] = [MessageFaults(0.3, 0.2, 0.05, 4.0), Create(0, 0, True, True), Create(1, 0, True, False), Kill(0, 2), Wait(6.0)]
FIXED = {
    "named-twice": NAMED_TWICE,
    "kill-and-reclaim": KILL_AND_RECLAIM,
    "host-and-keeper-die": HOST_AND_KEEPER_DIE,
    "holder-dies": HOLDER_DIES,
    "short-freeze": SHORT_FREEZE,
    "affinity-to-a-newcomer": AFFINITY_TO_A_NEWCOMER,
    "faulty-network": FAULTY_NETWORK,
    "keeper-frozen-as-host-dies": KEEPER_FROZEN_AS_HOST_DIES,
    "partitioned-holder": PARTITIONED_HOLDER,
}


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("history", list(FIXED.values()), ids=list(FIXED))
def test_a_fixed_history_keeps_every_invariant(history: list[Op]) -> None:
    for sim_seed in range(3):
        play(history, seed=sim_seed)


# A node frozen past its detection thaws, reads the SUSPECT rumors queued in its socket, refutes them at
# incarnation 1, and the others take that ALIVE over their DEAD at 0: membership never emits Buried(0) there
# (the DEAD rumor went to live members only), so the actor the others buried runs on.
FROZEN_PAST_DETECTION: list[Op] = [Create(0, 1, False, False), Wait(10.0), Freeze((Pick("host", 0),), 6.0), Wait(10.0)]
# One node cut off for 8 s declares every other DEAD; on the heal, the join handshake tells each of them so, and
# every node is Buried: every actor of the mesh stops, restartable ones too, though nobody re-created them.
ISOLATED_NODE_BURIES_THE_MESH: list[Op] = [
    Create(0, None, False, True),
    Create(1, None, False, True),
    Wait(12.0),
    Partition((Pick(),), 8.0),
]


@pytest.mark.timeout(TIMEOUT)
def test_a_node_frozen_past_its_detection_stops_what_the_others_buried() -> None:
    play(FROZEN_PAST_DETECTION)


@pytest.mark.timeout(TIMEOUT)
def test_a_node_cut_off_alone_does_not_bury_the_rest_of_the_mesh() -> None:
    play(ISOLATED_NODE_BURIES_THE_MESH)


def explore(test: Any, strategy: st.SearchStrategy[list[Op]], examples: int, fixed_seed: int, found: list[list[Op]]) -> None:
    """``examples`` drawn histories from a fixed seed in CI; with ZMESH_SIM_MINUTES, fresh seeds until half the time is spent."""
    if not SIM_MINUTES:
        prop = given(strategy, st.integers(0, 2**16))(test)
        for history in found:
            prop = example(history, 7)(prop)
        prop = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=HEALTH, phases=PHASES)(prop)
        seed(fixed_seed)(prop)()
        return
    faulthandler.cancel_dump_traceback_later()  # pytest's faulthandler_timeout would dump the stacks of a healthy run
    stop = time.monotonic() + SIM_MINUTES * 30
    while time.monotonic() < stop:
        # A full hypothesis run per round with a fresh seed; a failure is shrunk and printed as a play(...) call.
        chunk = settings(max_examples=50, deadline=None, database=None, suppress_health_check=HEALTH, phases=PHASES, print_blob=True)
        chunk(given(strategy, st.integers(0, 2**16))(test))()
    print(f"\n{test.__name__}: every invariant held; histories and known bugs met: {dict(MET)}")


@pytest.mark.timeout(TIMEOUT)
def test_drawn_histories_keep_every_invariant() -> None:
    explore(check_history, histories, 80, 20240611, [NAMED_TWICE + KILL_AND_RECLAIM, FROZEN_PAST_DETECTION])


@pytest.mark.timeout(TIMEOUT)
def test_drawn_deaths_leave_every_restartable_actor_running() -> None:
    explore(check_deaths, death_histories(), 30, 20240612, [HOST_AND_KEEPER_DIE])


# Found by `make torture` exploring fresh seeds: the node cut off alone declares another dead just before the heal,
# after the rest buried it and a keeper re-created its restartable actor elsewhere. That stale verdict reached a
# member of the larger side once the lone node was back, was adopted, and buried the node now hosting the actor:
# the actor was lost. A verdict of a member we buried with more weight is no longer adopted.
LONE_NODES_LATE_VERDICT: list[Op] = [
    Together((Create(0, None, False, False), Create(0, None, False, True))),
    Kill(0, 0),
    *[Create(0, None, False, False) for _ in range(5)],
    Partition((Pick("node", 0, 0),), 4.0),
]


@pytest.mark.timeout(TIMEOUT)
def test_a_late_verdict_of_a_buried_node_does_not_bury_a_node_of_the_larger_side() -> None:
    play(LONE_NODES_LATE_VERDICT, seed=52158)
