"""What CurveZMQ costs: the same calls over TCP with CURVE and with --insecure, and large arguments over IPC.

Usage: ``python benchmarks/security_cost.py [--quick]``. Each configuration runs in
a fresh process on an embedded node; the figures of one run are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

CONFIGS = {
    "curve-tcp": {"ZMESH_LOCAL_IPC": "0"},
    "insecure-tcp": {"ZMESH_LOCAL_IPC": "0", "ZMESH_INSECURE": "1"},
    "curve-ipc": {},
}


def _measure(quick: bool) -> dict[str, float]:
    import zmesh

    @zmesh.remote
    class Target:
        def ping(self) -> int:
            return 1

        def size(self, payload: bytes) -> int:
            return len(payload)

    zmesh.init()
    try:
        actor = Target.remote()
        zmesh.get(actor.ping.remote())
        sync_calls = 300 if quick else 3000
        start = time.perf_counter()
        for _ in range(sync_calls):
            zmesh.get(actor.ping.remote())
        sync = sync_calls / (time.perf_counter() - start)
        pipelined_calls = 2000 if quick else 20000
        start = time.perf_counter()
        zmesh.get([actor.ping.remote() for _ in range(pipelined_calls)])
        pipelined = pipelined_calls / (time.perf_counter() - start)
        payload = os.urandom(10 * 10**6 if quick else 100 * 10**6)
        zmesh.get(actor.size.remote(payload))
        reps = 3
        start = time.perf_counter()
        for _ in range(reps):
            zmesh.get(actor.size.remote(payload))
        big = reps * len(payload) / (time.perf_counter() - start) / 1e9
        return {"sync": sync, "pipelined": pipelined, "big_gbps": big}
    finally:
        zmesh.shutdown()


def _run(config: str, quick: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZMESH_")}
        env.update(CONFIGS[config], ZMESH_RUN_DIR=run_dir)
        args = [sys.executable, __file__, "--child"] + (["--quick"] if quick else [])
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (smoke test)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.quick)))
        return 0
    results: dict[str, Any] = {name: _run(name, args.quick) for name in CONFIGS}
    curve, plain, ipc = results["curve-tcp"], results["insecure-tcp"], results["curve-ipc"]
    print("\nCurveZMQ cost (zmesh, one run, 2 processes on this host, over TCP unless said):")
    for key, label in (("sync", "1:1 sync calls"), ("pipelined", "1:1 pipelined calls")):
        cost = 1 - curve[key] / plain[key]
        print(f"  {label:<22} CURVE {curve[key]:>9,.0f}/s   --insecure {plain[key]:>9,.0f}/s   CURVE costs {cost:+.0%}")
    print(
        f"  {'large argument':<22} CURVE over TCP {curve['big_gbps']:.2f} GB/s   --insecure TCP {plain['big_gbps']:.2f} GB/s   "
        f"same-host IPC (no cipher, the default) {ipc['big_gbps']:.2f} GB/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
