"""The ``zmesh`` command: node, status, stop. Parses arguments and calls; nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--resources must be JSON like '{{\"special\": 1}}': {exc}") from None
    from zmesh.options import validate_resources

    try:
        return validate_resources(value, "--resources")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _amount_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)}, got {text!r}")
    return text.upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmesh", description="A peer-to-peer actor mesh with Ray's actor API.")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run a node in the foreground (Ctrl-C or SIGTERM stops it and its workers)")
    # Flags that set a NodeConfig field default to None, so that --config can give the field instead (not both).
    node.add_argument("--listen", default=None, metavar="ADDRESS", help="IP address to listen on (default 127.0.0.1)")
    node.add_argument("--port", type=int, default=None, help="TCP port (0 picks a free one; default 6390)")
    node.add_argument(
        "--cluster-key", metavar="PATH", help="cluster key file (default: $ZMESH_CLUSTER_KEY_FILE, else your own per-user key)"
    )
    node.add_argument(
        "--insecure", action="store_true", default=None, help="no encryption or authentication at all: loopback only, for measuring"
    )
    node.add_argument("--num-cpus", type=_amount_arg, default=None, help="CPUs to advertise (default: all)")
    node.add_argument("--num-gpus", type=_amount_arg, default=None, help="GPUs to advertise (default 0)")
    node.add_argument(
        "--object-store-memory",
        metavar="BYTES",
        default=None,
        help="shared memory for large objects, e.g. 2G (default: 30%% of the machine's memory)",
    )
    node.add_argument("--resources", type=_resources, default=None, help="custom resources as JSON, e.g. '{\"special\": 1}'")
    node.add_argument("--log-level", type=_log_level, default="INFO", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    node.add_argument("--cluster", metavar="NAME", help="cluster name: nodes of this host with the same name find each other")
    node.add_argument("--join", metavar="HOST:PORT[,HOST:PORT]", help="seed nodes to join (also $ZMESH_JOIN)")
    node.add_argument(
        "--mdns", choices=("auto", "on", "off"), default=None, help="mDNS discovery (default auto: on when listening off loopback)"
    )
    node.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any node setting, e.g. probe_interval_s=0.1 (also $ZMESH_<KEY>); see zmesh/node/config.py. "
        "A setting with a flag of its own (port, num_cpus, cluster, ...) may be given either way, not both",
    )
    keygen = sub.add_parser("keygen", help="write a new cluster key file (mode 0600)")
    keygen.add_argument("path", nargs="?", help="where to write it (default: your per-user key file)")
    commands = (
        ("status", "show every member of the mesh, this node's resources and actors, and waiting creations"),
        ("stop", "stop the node running on this host"),
        ("list", "list the actors of the whole mesh: zmesh list actors [--namespace NS]"),
        ("kill", "kill a named actor anywhere in the mesh: zmesh kill NAME [--namespace NS]"),
        ("drain", "move a node's restartable actors elsewhere, then stop it: zmesh drain NODE_ID"),
    )
    for name, text in commands:
        cmd = sub.add_parser(name, help=text)
        if name == "list":
            cmd.add_argument("what", choices=("actors",))
        elif name == "kill":
            cmd.add_argument("name", help="the actor's name")
        elif name == "drain":
            cmd.add_argument("node", help="the node id (a unique prefix is enough), as zmesh status lists it")
        if name in ("list", "kill"):
            cmd.add_argument("--namespace", default=None, help="the actor's namespace (list: all by default; kill: default)")
        cmd.add_argument("--address", default="auto", help="host:port of the node (default: the one on this host)")
        cmd.add_argument("--cluster-key", metavar="PATH", help="cluster key file (default: the node's, or your own)")
        if name in ("status", "list"):
            cmd.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "node":
        return _run_node(args)
    if args.command == "keygen":
        return _keygen(args.path)
    return _client_command(args)


def _keygen(path: str | None) -> int:
    from zmesh.transport.security import ClusterKey, default_key_path

    target = path or str(default_key_path())
    try:
        written = ClusterKey.generate().save(target, make_parents=path is None)
    except FileExistsError:
        print(f"zmesh keygen: {target} already exists; remove it first to replace the key", file=sys.stderr)
        return 1
    except FileNotFoundError:
        print(f"zmesh keygen: cannot write {target}: its directory does not exist", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"zmesh keygen: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote a new cluster key to {written} (mode 0600); give it to every node (--cluster-key) and driver")
    return 0


# The flags that set a NodeConfig field: argparse dest -> (flag, field).
_NODE_FLAGS = {
    "listen": ("--listen", "host"),
    "port": ("--port", "port"),
    "cluster_key": ("--cluster-key", "cluster_key"),
    "insecure": ("--insecure", "insecure"),
    "num_cpus": ("--num-cpus", "num_cpus"),
    "num_gpus": ("--num-gpus", "num_gpus"),
    "resources": ("--resources", "resources"),
    "object_store_memory": ("--object-store-memory", "object_store_memory"),
    "cluster": ("--cluster", "cluster"),
    "join": ("--join", "join"),
    "mdns": ("--mdns", "mdns"),
}
# What those flags mean when neither they nor --config give the setting; as always, these beat $ZMESH_<KEY>.
_NODE_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 6390, "num_gpus": 0.0, "resources": {}, "insecure": False}


def _run_node(args: argparse.Namespace) -> int:
    from zmesh.node.config import NodeConfig, cli_settings, parse_field
    from zmesh.node.daemon import Node

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        given = {dest: getattr(args, dest) for dest in _NODE_FLAGS if getattr(args, dest) is not None}
        for dest in ("join", "mdns", "object_store_memory"):  # given as text, as --config would give them
            if dest in given:
                given[dest] = parse_field(dest, given[dest])
        flags = {field: (flag, given[dest]) for dest, (flag, field) in _NODE_FLAGS.items() if dest in given}
        settings = {**_NODE_DEFAULTS, **cli_settings(args.config, flags)}
        config = NodeConfig.from_env(**settings)
        node = Node(config)
    except (ValueError, OSError) as exc:
        print(f"zmesh node: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.request_stop())
    banner = f"zmesh node {node.node_id} listening on {node.address.removeprefix('tcp://')}"
    node.serve_forever(on_ready=lambda: print(banner, flush=True))
    return 0


def _client_command(args: argparse.Namespace) -> int:
    import zmesh
    from zmesh.exceptions import NodeUnavailableError
    from zmesh.runtime import current

    try:
        zmesh.init(address=args.address, connect_timeout=3.0, cluster_key=args.cluster_key)
    except (NodeUnavailableError, ValueError) as exc:
        print(f"zmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    try:
        rt = current()
        assert rt is not None
        if args.command == "stop":
            try:
                rt.request("stop")
            except NodeUnavailableError:
                pass  # it went away before its answer reached us: stopping is what was asked
            print(f"stopped the zmesh node at {rt.node_address.removeprefix('tcp://')}")
            return 0
        if args.command == "list":
            actors = rt.request("list_actors", (args.namespace,))
            print(json.dumps(actors, indent=2, sort_keys=True) if args.json else format_actors(actors))
            return 0
        if args.command == "kill":
            try:
                rt.request("kill_named", (args.namespace or "default", args.name))
            except ValueError as exc:
                print(f"zmesh kill: {exc}", file=sys.stderr)
                return 1
            print(f"killed actor {args.name!r}")
            return 0
        if args.command == "drain":
            try:
                node_id = rt.request("drain", (args.node,))
            except ValueError as exc:
                print(f"zmesh drain: {exc}", file=sys.stderr)
                return 1
            print(f"node {node_id} is draining: its restartable actors move to other nodes, then it stops")
            return 0
        status = rt.request("status")
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
        return 0
    finally:
        zmesh.shutdown()


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.1f} GiB"
    return f"{value:g}"


def format_actors(actors: list[dict[str, Any]]) -> str:
    lines = [f"{'ACTOR ID':<17} {'CLASS':<20} {'NAMESPACE':<12} {'NAME':<20} {'STATE':<17} NODE"]
    for a in sorted(actors, key=lambda a: (a["namespace"], a["name"] or "", a["actor_id"])):
        name = (a["name"] or "-") + (" (detached)" if a["detached"] else "")
        lines.append(f"{a['actor_id']:<17} {a['class_name']:<20} {a['namespace']:<12} {name:<20} {a['state']:<17} {a['node_id']}")
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    lines = [f"node {status['node_id']} at {status['address'].removeprefix('tcp://')} (pid {status['pid']}, up {status['uptime_s']:.0f} s)"]
    lines.append("resources (used / total):")
    total, available = status["resources_total"], status["resources_available"]
    for key in sorted(total):
        used = total[key] - available.get(key, 0.0)
        lines.append(f"  {key:<12} {_amount(key, used)} / {_amount(key, total[key])}")
    lines.append(f"actors ({len(status['actors'])}):")
    lines.append(f"  {'ACTOR ID':<17} {'CLASS':<20} {'NAME':<20} {'STATE':<17} {'PID':>7} {'RESTARTS':>8}")
    for a in status["actors"]:
        name = a["name"] or "-"
        if a["detached"]:
            name += " (detached)"
        lines.append(f"  {a['actor_id']:<17} {a['class_name']:<20} {name:<20} {a['state']:<17} {a['pid'] or '-':>7} {a['restarts']:>8}")
    waiting = status["waiting"]
    lines.append(f"waiting creations ({len(waiting)}):")
    for a in waiting:
        lines.append(f"  {a['actor_id']:<17} {a['class_name']:<20} needs {a['resources']}")
    tasks = status.get("tasks") or {}  # a node of an older version runs no tasks
    if tasks:
        lines.append(
            f"tasks: {tasks['granted']} worker lease(s) granted, {tasks['workers']} task worker(s) ({tasks['idle_workers']} idle), "
            f"{len(tasks['waiting'])} lease request(s) waiting:"
        )
        for w in tasks["waiting"]:
            why = "  (no member could ever fit it)" if w.get("warned") else ""
            lines.append(f"  tasks needing {w['demand']} waiting {w['waited_s']:g} s{why}")
    counts = f"dropped messages: {status['dropped_messages']}   refused connections: {status['refused_connections']}"
    members = status.get("members") or []
    lines.append(f"members ({len(members)}):")
    lines.append(
        f"  {'NODE ID':<13} {'ADDRESS':<22} {'STATE':<8} {'CPU used/total':<15} {'GPU used/total':<15} {'ACTORS':>6} {'WAITING':>7}"
    )
    for m in members:
        total, avail = m["resources_total"], m["resources_available"]
        cpu = f"{total.get('CPU', 0) - avail.get('CPU', 0):g}/{total.get('CPU', 0):g}"
        gpu = f"{total.get('GPU', 0) - avail.get('GPU', 0):g}/{total.get('GPU', 0):g}"
        state = m["state"] + (" draining" if m.get("draining") else "")
        lines.append(
            f"  {m['node_id']:<13} {m['address'].removeprefix('tcp://'):<22} {state:<8} {cpu:<15} {gpu:<15} "
            f"{m['actors']:>6} {m['pending']:>7}"
        )
    lines.append(f"clients: {status['clients']}   {counts}")
    if "loop_lag_ms" in status:  # a node of an older version does not measure it
        late, busy = status["loop_lag_ms"], status.get("loop_busy_ms") or {}
        lines.append(
            f"loop lag (last 60 s, ms): late p50 {late['p50']:g} p99 {late['p99']:g} max {late['max']:g}   "
            f"busy p50 {busy.get('p50', 0):g} p99 {busy.get('p99', 0):g} max {busy.get('max', 0):g}"
        )
    lines.append(f"security: {'CurveZMQ, cluster ' + status['cluster'] if status['secure'] else 'NONE (--insecure)'}")
    return "\n".join(lines)
