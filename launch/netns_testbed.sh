#!/usr/bin/env bash
# Emulated cluster on one machine: N network namespaces on a bridge, each host's link shaped
# with tc tbf (RATE Mbit/s in each direction). Bandwidth only: netem is not used, so no
# delay/loss emulation. Needs root and iproute2 (`ip`, `tc`).
#
#   sudo launch/netns_testbed.sh up N RATE_MBIT   # builds it, prints how to run commands, stays
#                                                 # in the foreground; Ctrl-C removes everything
#   sudo launch/netns_testbed.sh down             # removes testbeds left by dead processes
#   sudo launch/netns_testbed.sh check            # can a testbed be built here?
#   sudo launch/netns_testbed.sh measure [RATE_MBIT] [MBYTES]  # 2 hosts, prints measured Mbit/s
#
# Inside host i:  ip netns exec lb<PID>-h<i> <cmd>   (address 10.77.X.<i+1>, interface eth0:
# GLOO_SOCKET_IFNAME=eth0, MASTER_ADDR=<address of host 0>). All logic lives in lowbit/net/ (netns.py, iproute.py, testbed.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py="python3"; fi
fi
cmd="${1:-}"
case "$cmd" in
  up)
    [[ $# -ge 3 ]] || { echo "usage: $0 up N RATE_MBIT|none [--prefix P] [--burst-kbit K]" >&2; exit 2; }
    shift; exec env PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" -m lowbit.net.netns up "$@" ;;
  down|check|measure)
    shift; exec env PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" -m lowbit.net.netns "$cmd" "$@" ;;
  *)
    sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
