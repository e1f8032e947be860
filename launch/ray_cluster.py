"""Train on an existing Ray cluster: ``python launch/ray_cluster.py --address auto [train flags...]``.

Start the cluster first (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the
others; with ``RAY_AUTH_MODE=disabled`` in their environment), then run this on any node. The flags
are those of ``lowbit train`` (``--workers``, ``--servers``, ``--w-bits``, ``--g-bits``, ...); the
transport is always ``ray``. ``--address`` defaults to ``$LOWBIT_RAY_ADDRESS``, else ``auto``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.cli import add_train_args, config_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch/ray_cluster.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("LOWBIT_RAY_ADDRESS") or "auto",
                    help="Ray cluster address: auto (the cluster on this node) or HOST:PORT / ray://HOST:PORT")
    add_train_args(ap)
    args = ap.parse_args(argv)
    args.transport = "ray"
    cfg = config_from_args(args)
    cfg.override("transport", {"ray_address": args.address})
    from lowbit.train.ray_launch import run_ray

    print(json.dumps(run_ray(cfg.validate()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
