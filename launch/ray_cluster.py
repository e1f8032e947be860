"""Train on an existing Ray cluster: ``python launch/ray_cluster.py --address HOST:PORT [train flags...]``.

Start the cluster first, with ``RAY_AUTH_MODE=disabled`` in the environment of every ``ray start``::

    RAY_AUTH_MODE=disabled ray start --head --port 6379 --num-cpus 2 --include-dashboard false
    RAY_AUTH_MODE=disabled ray start --address HEAD:6379          # on each other node

then run this on any node of it. The flags are those of ``lowbit train`` (``--workers``,
``--servers``, ``--w-bits``, ``--g-bits``, ``--out``, ...); the transport is always ``ray``.

``--address`` defaults to ``$LOWBIT_RAY_ADDRESS``, else ``auto``: the cluster ``ray start`` recorded
in ``--ray-temp-dir`` (the ``--temp-dir`` it was given; default ``/tmp/ray``), else any cluster
running on this node. This never starts a cluster of its own: with none there it exits with status 2.

Printed: the JSON summary on stdout; where the cluster was and where the summary, metrics and
checkpoints went on stderr (``lowbit:`` lines).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from lowbit.train.args import add_train_args, config_from_args


def gcs_address(address: str, temp_dir: str | None = None) -> str:
    """The HOST:PORT that ``ray.init(address)`` would join (Ray's own resolution of ``auto``), checked
    to be listening: a dead or stale address is a ``ConnectionError`` at once, where ``ray.init``
    would retry for minutes. ``ray://`` addresses (Ray Client) are returned as they are."""
    if address.startswith("ray://"):
        return address
    from ray._private.services import canonicalize_bootstrap_address

    addr = canonicalize_bootstrap_address(address, os.path.abspath(temp_dir) if temp_dir else None)
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"nothing listens at {addr}: {e}") from e
    return addr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch/ray_cluster.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("LOWBIT_RAY_ADDRESS") or "auto",
                    help="Ray cluster address: HOST:PORT (the head's --port), ray://HOST:PORT, or auto")
    ap.add_argument("--ray-temp-dir", default=None,
                    help="with --address auto: the --temp-dir the head was started with (where its address is recorded)")
    add_train_args(ap)
    args = ap.parse_args(argv)
    args.transport = "ray"
    cfg = config_from_args(args)
    cfg.override("transport", {"ray_address": args.address})
    cfg.validate()

    import ray

    from lowbit.comm.ray import init_local
    from lowbit.train.preflight import preflight
    from lowbit.train.ray_launch import run_ray

    try:
        init_local(num_cpus=1, address=gcs_address(args.address, args.ray_temp_dir))
    except ConnectionError as e:
        print(f"lowbit: no Ray cluster at {args.address!r} ({e}); start one with `ray start --head` "
              "or pass --address HOST:PORT", file=sys.stderr)
        return 2
    try:
        node = ray._private.worker._global_node
        cpus = ray.cluster_resources().get("CPU", 0)
        print(f"lowbit: connected to the Ray cluster at {ray.get_runtime_context().gcs_address} "
              f"({len(ray.nodes())} node(s), {cpus:g} CPUs; session {node.get_session_dir_path()})",
              file=sys.stderr, flush=True)
        cfg, resume = preflight(cfg)
        summary = run_ray(cfg, resume=resume)  # Ray is initialized: run_ray uses this connection and leaves it open
    finally:
        ray.shutdown()  # disconnects this driver; the cluster keeps running
    out = Path(cfg.run.out).resolve()
    print(json.dumps(summary, indent=1), flush=True)
    print(f"lowbit: summary written to {out / 'summary.json'} (metrics {out / 'metrics.jsonl'}, "
          f"checkpoints {out / 'ckpt'})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
