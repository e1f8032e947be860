"""Real links shaped with Linux ``tc`` between network namespaces: :class:`Testbed`, and
:func:`measure_throughput` over its links.

Layout of one :class:`Testbed` (nothing is added to the caller's own namespace)::

    hub namespace  "{tag}-hub"                 host namespaces "{tag}-h{i}"
      br0 (bridge) --- p0  <== veth ==>  eth0  10.77.X.1/24   (host 0)
                   --- p1  <== veth ==>  eth0  10.77.X.2/24   (host 1)
                   ...

``tag`` is ``{prefix}{pid}`` for the first testbed of a process and ``{prefix}{pid}n{k}`` for
later ones, so concurrent runs (different pids) and several testbeds in one process never
collide. Each host sees one interface, ``eth0`` (use it as ``GLOO_SOCKET_IFNAME``).

Shaping: a token bucket filter (``tc qdisc ... root tbf rate R burst B latency 50ms``) sits on the
egress of *both* ends of every veth: on the host's ``eth0`` it shapes the host's uplink, on the
bridge port ``p{i}`` it shapes the host's downlink. Each host therefore has a full-duplex link of
rate R in each direction, and a switch (the bridge) with unlimited backplane.

Limits: only bandwidth is emulated. No ``sch_netem`` is used (not every kernel has it), so there is
no added delay, jitter or loss; the latency a benchmark sees is that of veth + bridge (tens of µs).

Cleanup: :meth:`Testbed.close` kills the processes it started and deletes every namespace
(deleting a namespace deletes its veths and the bridge). It runs on ``with`` exit (also on an
exception or KeyboardInterrupt, i.e. SIGINT), at interpreter exit (atexit), and on SIGTERM/SIGHUP
(a handler is installed the first time a testbed is created in the main thread, when those
signals still have their default handler). :func:`~lowbit.net.iproute.cleanup_stale` removes
leftovers of dead pids.
"""
from __future__ import annotations

import atexit
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

from lowbit.errors import ConfigError
from lowbit.net.iproute import NetnsError, ip_cmd, list_namespaces, sh

HOST_IFNAME = "eth0"
BRIDGE = "br0"
SUBNET_FIRST_OCTETS = "10.77"


@dataclass(frozen=True)
class LinkSpec:
    """One host's link: ``rate_mbit`` in each direction (None = unshaped).

    ``burst_kbit`` is the tbf bucket size. When None it defaults to
    ``max(256, rate_mbit * 1000 * 0.001)`` kbit, i.e. one millisecond of traffic at the line rate
    but never less than 256 kbit (32 KiB): a smaller bucket cannot pass a full TSO/GSO segment
    train at gigabit rates and makes tbf throttle below the configured rate.
    ``latency_ms`` bounds the tbf queue (packets that would wait longer are dropped), which
    is what keeps TCP's congestion control honest instead of an unbounded buffer.
    """

    rate_mbit: float | None
    burst_kbit: int | None = None
    latency_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ConfigError(f"LinkSpec.rate_mbit must be > 0 or None (unshaped), got {self.rate_mbit}")
        if self.burst_kbit is not None and self.burst_kbit <= 0:
            raise ConfigError(f"LinkSpec.burst_kbit must be > 0, got {self.burst_kbit}")
        if not self.latency_ms > 0:
            raise ConfigError(f"LinkSpec.latency_ms must be > 0, got {self.latency_ms}")

    @property
    def shaped(self) -> bool:
        return self.rate_mbit is not None

    def effective_burst_kbit(self) -> int:
        if self.burst_kbit is not None:
            return int(self.burst_kbit)
        assert self.rate_mbit is not None
        return max(256, int(math.ceil(self.rate_mbit * 1000 * 0.001)))

    def tbf_args(self) -> list[str]:
        """Arguments after ``tc qdisc add dev X root``."""
        if self.rate_mbit is None:
            raise ConfigError("an unshaped LinkSpec has no tbf arguments")
        rate_kbit = int(round(self.rate_mbit * 1000))
        return ["tbf", "rate", f"{rate_kbit}kbit", "burst", f"{self.effective_burst_kbit()}kbit",
                "latency", f"{self.latency_ms:g}ms"]


# ----------------------------------------------------------------------------------------------
# registry of live testbeds, closed at exit and on SIGTERM/SIGHUP
_LIVE: "weakref.WeakSet[Testbed]" = weakref.WeakSet()
_COUNTER = itertools.count()
_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _close_all() -> None:
    for tb in list(_LIVE):
        try:
            tb.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum, frame):  # noqa: ARG001
    _close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


class Testbed:
    """``n_hosts`` namespaces on one shaped bridge; see the module docstring for the layout.

    >>> with Testbed(2, LinkSpec(50)) as tb:            # doctest: +SKIP
    ...     p = tb.run(0, ["python", "-c", "print(1)"])
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, n_hosts: int, link: LinkSpec, prefix: str = "lb") -> None:
        if not 1 <= n_hosts <= 250:
            raise ConfigError(f"Testbed needs 1..250 hosts, got {n_hosts}")
        if not re.fullmatch(r"[a-z][a-z_]{0,11}", prefix):
            raise ConfigError(f"Testbed prefix must be 1-12 lowercase letters/underscore, got {prefix!r}")
        self.n_hosts = n_hosts
        self.link = link
        self.prefix = prefix
        pid = os.getpid()
        with _LOCK:
            k = next(_COUNTER)
        self.tag = f"{prefix}{pid}" if k == 0 else f"{prefix}{pid}n{k}"
        self.subnet_octet = 1 + (pid * 7 + k) % 250
        self.hub = f"{self.tag}-hub"
        self._hosts = [f"{self.tag}-h{i}" for i in range(n_hosts)]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        _install_handlers()
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction
    def _add_ns(self, name: str) -> None:
        if name in list_namespaces():
            raise NetnsError(f"namespace {name} already exists (stale? run cleanup_stale({self.prefix!r}))")
        ip_cmd("netns", "add", name)
        self._created.append(name)
        ip_cmd("link", "set", "lo", "up", ns=name)

    def _tc(self, ns: str, dev: str) -> None:
        if self.link.shaped:
            sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *self.link.tbf_args()])

    def _build(self) -> None:
        self._add_ns(self.hub)
        ip_cmd("link", "add", "name", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0",
                ns=self.hub)
        ip_cmd("link", "set", BRIDGE, "up", ns=self.hub)
        for i, host in enumerate(self._hosts):
            self._add_ns(host)
            port = f"p{i}"
            ip_cmd("link", "add", "name", port, "type", "veth", "peer", "name", HOST_IFNAME, "netns", host,
                    ns=self.hub)
            ip_cmd("link", "set", port, "master", BRIDGE, ns=self.hub)
            ip_cmd("link", "set", port, "up", ns=self.hub)
            ip_cmd("addr", "add", f"{self.addr(i)}/24", "dev", HOST_IFNAME, ns=host)
            ip_cmd("link", "set", HOST_IFNAME, "up", ns=host)
            self._tc(host, HOST_IFNAME)   # uplink of host i
            self._tc(self.hub, port)      # downlink of host i

    # ------------------------------------------------------------------ queries
    @property
    def hosts(self) -> list[str]:
        """Namespace names of the hosts, index = host number."""
        return list(self._hosts)

    def addr(self, i: int) -> str:
        """IPv4 address of host ``i`` (10.77.X.(i+1))."""
        self._check_host(i)
        return f"{SUBNET_FIRST_OCTETS}.{self.subnet_octet}.{i + 1}"

    def ifname(self, i: int) -> str:
        """Name of host ``i``'s interface inside its namespace (for GLOO_SOCKET_IFNAME)."""
        self._check_host(i)
        return HOST_IFNAME

    def qdiscs(self, i: int) -> tuple[str, str]:
        """``tc qdisc show`` of host i's uplink (eth0) and downlink (bridge port), for inspection."""
        up = sh(["ip", "netns", "exec", self._hosts[i], "tc", "qdisc", "show", "dev", HOST_IFNAME]).stdout
        down = sh(["ip", "netns", "exec", self.hub, "tc", "qdisc", "show", "dev", f"p{i}"]).stdout
        return up.strip(), down.strip()

    def _check_host(self, i: int) -> None:
        if not 0 <= i < self.n_hosts:
            raise ConfigError(f"host index must be in 0..{self.n_hosts - 1}, got {i}")

    # ------------------------------------------------------------------ processes
    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``ip netns exec <host i> argv...``."""
        self._check_host(i)
        return ["ip", "netns", "exec", self._hosts[i], *argv]

    def run(self, i: int, argv: list[str], env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``i``; the process is killed on :meth:`close` if still alive."""
        if self._closed:
            raise NetnsError("testbed is closed")
        proc = subprocess.Popen(self.exec_argv(i, list(argv)), env=env, **popen_kwargs)
        self._procs.append(proc)
        return proc

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill the processes started by :meth:`run` and delete every namespace created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in self._procs:
            if p.poll() is None:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        errors = []
        for name in reversed(self._created):
            res = ip_cmd("netns", "del", name, check=False)
            if res.returncode != 0:
                errors.append(f"{name}: {res.stderr.strip()}")
        self._created.clear()
        _LIVE.discard(self)
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def describe(self) -> str:
        rate = "unshaped" if not self.link.shaped else (
            f"{self.link.rate_mbit:g} Mbit/s each way (tbf burst {self.link.effective_burst_kbit()}kbit, "
            f"latency {self.link.latency_ms:g}ms)")
        lines = [f"testbed {self.tag}: hub namespace {self.hub} (bridge {BRIDGE}), {self.n_hosts} hosts, {rate}"]
        for i, h in enumerate(self._hosts):
            lines.append(f"  host {i}: ip netns exec {h} <cmd>    addr {self.addr(i)}  ifname {HOST_IFNAME}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
_RECV_CODE = r"""
import socket, sys, time
host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(60)
buf = bytearray(1 << 20); got = 0; t0 = None
while got < nbytes:
    k = c.recv_into(buf)
    if not k: break
    if t0 is None: t0 = time.perf_counter(); first = k
    got += k
t1 = time.perf_counter()
c.sendall(b"k"); c.close()
print(got, first, t1 - t0, flush=True)
"""

_SEND_CODE = r"""
import socket, sys
host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=60)
chunk = b"\0" * (1 << 20); left = nbytes
while left > 0:
    n = s.send(chunk[:min(left, len(chunk))]); left -= n
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
"""


def measure_throughput(testbed: Testbed, src: int, dst: int, nbytes: int, port: int = 5201,
                       timeout_s: float = 60.0) -> float:
    """TCP goodput from host ``src`` to host ``dst`` in Mbit/s (stdlib sockets, one stream).

    The receiver times from the first to the last received byte and excludes the first read,
    so connection setup and the initial tbf burst do not inflate the number.
    """
    if src == dst:
        raise ConfigError("measure_throughput needs two different hosts")
    py = sys.executable
    recv = testbed.run(dst, [py, "-c", _RECV_CODE, testbed.addr(dst), str(port), str(nbytes)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = recv.stdout.readline()
        if line.strip() != "ready":
            raise NetnsError(f"receiver did not start: {line!r} {recv.stderr.read()}")
        send = testbed.run(src, [py, "-c", _SEND_CODE, testbed.addr(dst), str(port), str(nbytes)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = recv.communicate(timeout=timeout_s)
        _, serr = send.communicate(timeout=timeout_s)
        if recv.returncode != 0 or send.returncode != 0:
            raise NetnsError(f"throughput probe failed: receiver rc={recv.returncode} {err.strip()} "
                             f"sender rc={send.returncode} {serr.strip()}")
    finally:
        for p in (recv,):
            if p.poll() is None:
                p.kill()
                p.wait()
    got, first, secs = out.split()
    got, first, secs = int(got), int(first), float(secs)
    if got < nbytes:
        raise NetnsError(f"receiver got {got} of {nbytes} bytes")
    return (got - first) * 8 / max(secs, 1e-9) / 1e6
