"""Node settings that have a flag of their own also work as ``--config KEY=VALUE`` and in LocalCluster(config=)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmesh.node.admin import request
from zmesh.node.config import NodeConfig
from zmesh.testing import LocalCluster, NodeProcess, wait_for
from zmesh.transport.security import ClusterKey, Security, resolve_key

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(node: NodeProcess, security: Security | None = None) -> dict[str, Any]:
    return dict(request(f"tcp://{node.address}", "status", (), security=security or Security(resolve_key()[0]), timeout=5))


# field -> (--config value, the flag spelling it, what the running node must show). ``{key}``, ``{port}``
# and ``{seed}`` are filled in per test.
Check = Callable[[NodeProcess, dict[str, Any]], bool]
CASES: dict[str, tuple[str, list[str], Check]] = {
    "host": ("127.0.0.2", ["--listen", "127.0.0.2"], lambda n, ctx: n.address.startswith("127.0.0.2:")),
    "port": ("{port}", ["--port", "{port}"], lambda n, ctx: n.address == f"127.0.0.1:{ctx['port']}"),
    "cluster_key": (
        "{key}",
        ["--cluster-key", "{key}"],
        lambda n, ctx: _status(n, Security(ctx["key_obj"]))["cluster"] == ctx["key_obj"].fingerprint,
    ),
    "insecure": ("on", ["--insecure"], lambda n, ctx: _status(n, Security(None))["secure"] is False),
    "num_cpus": ("3", ["--num-cpus", "1"], lambda n, ctx: _status(n)["resources_total"]["CPU"] == 3),
    "num_gpus": ("2", ["--num-gpus", "1"], lambda n, ctx: _status(n)["resources_total"]["GPU"] == 2),
    "resources": (
        '{"special": 2}',
        ["--resources", '{"special": 1}'],
        lambda n, ctx: _status(n)["resources_total"]["special"] == 2,
    ),
    "object_store_memory": (
        "3M",
        ["--object-store-memory", "2G"],
        lambda n, ctx: _status(n)["object_store"]["capacity"] == 3 * 2**20,
    ),
    "cluster": (
        "named-by-config",
        ["--cluster", "other"],
        lambda n, ctx: any((Path(n.run_dir) / "clusters" / "named-by-config").glob("*.json")),
    ),
    "join": ("{seed}", ["--join", "{seed}"], lambda n, ctx: len(_status(n)["members"]) == 2),
    # On loopback mDNS is off unless asked for; asking for it here would send multicast off the host.
    "mdns": ("off", ["--mdns", "auto"], lambda n, ctx: _status(n)["secure"]),
}


def _fill(text: str, ctx: dict[str, Any]) -> str:
    for name in ("key", "port", "seed"):
        text = text.replace("{" + name + "}", str(ctx.get(name, "")))
    return text


@pytest.fixture
def ctx(tmp_path: Path) -> dict[str, Any]:
    key = tmp_path / "cluster.key"
    ClusterKey.generate().save(key)
    return {"key": str(key), "key_obj": ClusterKey.load(key), "port": _free_port(), "tmp": tmp_path}


def test_every_flagged_setting_has_a_case() -> None:
    from zmesh.cli import _NODE_FLAGS

    assert {field for _, field in _NODE_FLAGS.values()} == set(CASES)


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_flagged_setting_given_as_config_reaches_the_node(field: str, ctx: dict[str, Any], isolated_run_dir: Path) -> None:
    value, _, check = CASES[field]
    seed = NodeProcess(str(ctx["tmp"] / "seed-run"), *_fast()) if field == "join" else None
    try:
        ctx["seed"] = seed.address if seed is not None else ""
        node = NodeProcess(str(isolated_run_dir), "--config", f"{field}={_fill(value, ctx)}", *_fast())
        try:
            if field == "join":
                wait_for(lambda: len(_status(node)["members"]) == 2, 30, what="the seed's mesh joined")
            assert check(node, ctx)
        finally:
            assert node.stop() == 0
    finally:
        if seed is not None:
            seed.stop()


def _fast() -> list[str]:
    from zmesh.testing import FAST_MESH

    return [a for k, v in FAST_MESH.items() for a in ("--config", f"{k}={v}")]


def _node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zmesh", "node", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_setting_given_as_flag_and_config_is_refused_in_one_line(field: str, ctx: dict[str, Any]) -> None:
    value, flag, _ = CASES[field]
    ctx["seed"] = "127.0.0.1:9"
    port = [] if field == "port" else ["--port", "0"]
    out = _node_cli(*port, *[_fill(a, ctx) for a in flag], "--config", f"{field}={_fill(value, ctx)}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"zmesh node: {flag[0]} and --config {field}=... both set {field}; give only one"]


BAD = {
    "host": "not-an-ip",
    "port": "70000",
    "cluster_key": "/no/such/key",
    "insecure": "maybe",
    "num_cpus": "nan",
    "num_gpus": "-1",
    "resources": '{"CPU": 1}',
    "cluster": "a/b",
    "join": "nohostport",
    "mdns": "sometimes",
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_is_refused_in_one_line_naming_it(field: str) -> None:
    out = _node_cli("--port", "0", "--config", f"{field}={BAD[field]}") if field != "port" else _node_cli("--config", f"port={BAD[field]}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("zmesh node: ")
    assert field.replace("_", " ") in line.replace("_", " ") or BAD[field] in line, line


def test_an_unknown_key_or_a_missing_value_is_refused_in_one_line() -> None:
    for item, says in (("nosuch=1", "unknown node setting 'nosuch'"), ("num_cpus", "--config takes KEY=VALUE")):
        out = _node_cli("--port", "0", "--config", item)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert says in line, line


_FIELDS = [f for f in NodeConfig.__dataclass_fields__]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(_FIELDS), st.text(max_size=12)), raw=st.text(max_size=20))
def test_any_config_item_makes_a_config_or_a_value_error_naming_it(key: str, raw: str) -> None:
    from zmesh.node.config import cli_settings

    if key == "cluster_key" or "=" in key:
        return  # a file is read later, by the node; a key cannot hold "="
    try:
        NodeConfig.from_env(**cli_settings([f"{key}={raw}"], {}))
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message
        named = (key.strip(), repr(key.strip()), raw, repr(raw))
        assert any(text in message for text in named), message


def test_local_cluster_takes_flagged_settings_in_config(tmp_path: Path) -> None:
    config = {"num_cpus": 3, "num_gpus": 1, "resources": {"special": 2}, "cluster": "lc-by-config", "host": "127.0.0.2", "mdns": False}
    with LocalCluster(nodes=2, config=config) as cluster:
        for i in (0, 1):
            status = cluster.status(i)
            assert status["address"].startswith("tcp://127.0.0.2:")
            assert {k: status["resources_total"][k] for k in ("CPU", "GPU", "special")} == {"CPU": 3, "GPU": 1, "special": 2}
        assert len(list((Path(cluster.run_dir) / "clusters" / "lc-by-config").glob("*.json"))) == 2
    key = tmp_path / "cluster.key"
    ClusterKey.generate().save(key)
    port = _free_port()
    with LocalCluster(nodes=1, config={"port": port, "cluster_key": str(key)}) as first:
        assert first.addresses == [f"127.0.0.1:{port}"]
        assert first.status(0)["cluster"] == ClusterKey.load(key).fingerprint
    # A LocalCluster that joins outsiders never converges to just its own nodes; joining is tested through the CLI.
    seeded = LocalCluster(nodes=1, config={"join": ["127.0.0.1:7001", "127.0.0.1:7002"]})
    assert "join=127.0.0.1:7001,127.0.0.1:7002" in seeded._node_args(0, None)
    with LocalCluster(nodes=1, config={"insecure": True}) as insecure:
        assert insecure.status(0)["secure"] is False


def test_local_cluster_refuses_a_setting_given_as_argument_and_in_config() -> None:
    for kwargs in ({"num_cpus": 1}, {"num_gpus": 1}, {"resources": {"x": 1}}):
        key = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{key} is given both"):
            LocalCluster(nodes=1, config={key: kwargs[key]}, **kwargs)  # type: ignore[arg-type]
