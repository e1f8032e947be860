"""The ``ip`` / ``tc`` commands behind the netns testbeds: running them, whether this process may
(:func:`netns_available`), and the named namespaces there are (:func:`list_namespaces`,
:func:`cleanup_stale` for those of processes that are gone).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from lowbit.errors import LowbitError


class NetnsError(LowbitError, RuntimeError):
    """An ``ip``/``tc`` command failed while building or using a testbed."""


def ip_cmd(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``ip [-n ns] args...`` (see :func:`sh`)."""
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return sh(argv, check=check)


def sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv``, output captured; with ``check`` a nonzero exit is a :class:`NetnsError`."""
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetnsError(f"command {' '.join(argv)!r} failed with exit code {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """``(True, "")`` when this process can build a testbed, else ``(False, reason)``.

    Checks: running as root, ``ip`` and ``tc`` on PATH (package iproute2), and that a throwaway
    namespace with a veth pair and a tbf qdisc can be created and deleted. Cached per process.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "needs root (ip netns / tc require CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found on PATH (install iproute2)"
    ns = f"lbprobe{os.getpid()}"
    try:
        ip_cmd("netns", "add", ns)
    except NetnsError as e:
        return False, f"cannot create a network namespace: {e}"
    try:
        ip_cmd("link", "add", "name", "vprobe0", "type", "veth", "peer", "name", "vprobe1", ns=ns)
        sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "vprobe0", "root", "tbf",
             "rate", "10mbit", "burst", "256kbit", "latency", "50ms"])
    except NetnsError as e:
        return False, f"cannot create a veth pair with a tbf qdisc in a namespace: {e}"
    finally:
        ip_cmd("netns", "del", ns, check=False)
    if ns in list_namespaces():
        return False, f"could not delete the probe namespace {ns}"
    return True, ""


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    res = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


TAG_RE = r"(?P<pid>\d+)(?:n\d+)?-(?:hub|h\d+)$"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "lb") -> list[str]:
    """Delete namespaces ``{prefix}{pid}...-hub|-h{i}`` whose creating pid no longer exists.

    Returns the names deleted. Namespaces of live processes are left alone. Processes still
    running inside a stale namespace are not killed (only the name is removed).
    """
    pat = re.compile("^" + re.escape(prefix) + TAG_RE)
    removed = []
    for name in list_namespaces():
        m = pat.match(name)
        if m and not _pid_alive(int(m.group("pid"))):
            ip_cmd("netns", "del", name, check=False)
            removed.append(name)
    return removed
