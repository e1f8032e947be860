"""Real links shaped with Linux ``tc`` between network namespaces.

The testbed (:class:`~lowbit.net.testbed.Testbed`: layout, shaping, cleanup) and the ``ip`` /
``tc`` commands under it (:mod:`lowbit.net.iproute`) are imported from here.

CLI (one implementation for ``launch/netns_testbed.sh``)::

    python -m lowbit.net.netns up N RATE_MBIT [--prefix lb]   # keeps it until Ctrl-C / SIGTERM
    python -m lowbit.net.netns down [--prefix lb]             # removes testbeds of dead pids
    python -m lowbit.net.netns check                          # prints netns_available()
    python -m lowbit.net.netns measure [RATE_MBIT] [MBYTES]   # 2 hosts, prints Mbit/s
"""
from __future__ import annotations

import os
import re
import sys
import time

from lowbit.net.iproute import TAG_RE, NetnsError, cleanup_stale, list_namespaces, netns_available
from lowbit.net.testbed import LinkSpec, Testbed, measure_throughput

__all__ = [
    "LinkSpec",
    "NetnsError",
    "Testbed",
    "cleanup_stale",
    "list_namespaces",
    "measure_throughput",
    "netns_available",
]


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lowbit.net.netns", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a testbed and keep it until Ctrl-C / SIGTERM")
    up.add_argument("n", type=int, help="number of hosts")
    up.add_argument("rate", help="Mbit/s per direction, or 'none' for unshaped")
    up.add_argument("--burst-kbit", type=int, default=None)
    up.add_argument("--prefix", default="lb")
    down = sub.add_parser("down", help="delete testbeds of processes that are gone")
    down.add_argument("--prefix", default="lb")
    sub.add_parser("check", help="print whether netns testbeds can be built here")
    ms = sub.add_parser("measure", help="2-host testbed, print measured Mbit/s")
    ms.add_argument("rate", nargs="?", default="50")
    ms.add_argument("mbytes", nargs="?", type=float, default=4.0)
    args = ap.parse_args(argv)

    if args.cmd == "check":
        ok, why = netns_available()
        print("available" if ok else f"not available: {why}")
        return 0 if ok else 1
    if args.cmd == "down":
        removed = cleanup_stale(args.prefix)
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        live = [n for n in list_namespaces() if re.match("^" + re.escape(args.prefix) + TAG_RE, n)]
        if live:
            print("still up (owner alive; stop its `up` with Ctrl-C or kill -TERM <pid>): " + " ".join(live))
        return 0
    rate = None if str(args.rate).lower() in ("none", "0", "inf") else float(args.rate)
    ok, why = netns_available()
    if not ok:
        print(f"netns testbed not available: {why}", file=sys.stderr)
        return 2
    if args.cmd == "measure":
        with Testbed(2, LinkSpec(rate), prefix="lbm") as tb:
            mbit = measure_throughput(tb, 0, 1, int(args.mbytes * 1e6))
        print(f"link {rate if rate else 'unshaped'} Mbit/s -> measured {mbit:.1f} Mbit/s")
        return 0
    with Testbed(args.n, LinkSpec(rate, args.burst_kbit), prefix=args.prefix) as tb:
        print(tb.describe())
        print(f"pid {os.getpid()}: press Ctrl-C (or kill -TERM {os.getpid()}) to remove it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nremoving testbed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
