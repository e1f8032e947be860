import os
import subprocess
import sys
import textwrap

import pytest

from lowbit.errors import ConfigError
from lowbit.net.netns import LinkSpec, Testbed, cleanup_stale, list_namespaces, measure_throughput, netns_available

OK, WHY = netns_available()
needs_netns = pytest.mark.skipif(not OK, reason=f"netns testbed not available: {WHY}")
pytestmark = pytest.mark.netns


def _mine(tag):
    return [n for n in list_namespaces() if n.startswith(tag + "-")]


@pytest.mark.timeout(10)
def test_linkspec_defaults_and_validation():
    assert LinkSpec(50).effective_burst_kbit() == 256
    assert LinkSpec(10_000).effective_burst_kbit() == 10_000
    assert LinkSpec(50).tbf_args() == ["tbf", "rate", "50000kbit", "burst", "256kbit", "latency", "50ms"]
    assert LinkSpec(None).shaped is False
    with pytest.raises(ConfigError):
        LinkSpec(0)
    with pytest.raises(ConfigError):
        LinkSpec(None).tbf_args()


@needs_netns
@pytest.mark.timeout(60)
def test_shaped_link_rate_and_unshaped_much_faster():
    with Testbed(2, LinkSpec(50), prefix="lbta") as tb:
        assert len(_mine(tb.tag)) == 3  # hub + 2 hosts
        up, down = tb.qdiscs(1)
        assert "tbf" in up and "50Mbit" in up and "tbf" in down
        shaped = measure_throughput(tb, 0, 1, 3_000_000)
        back = measure_throughput(tb, 1, 0, 3_000_000)
    assert 35 <= shaped <= 55, shaped
    assert 35 <= back <= 55, back
    assert _mine(tb.tag) == []
    with Testbed(2, LinkSpec(None), prefix="lbta") as tb2:
        fast = measure_throughput(tb2, 0, 1, 50_000_000)
    assert fast > 10 * shaped, (fast, shaped)
    assert _mine(tb2.tag) == []


@needs_netns
@pytest.mark.timeout(30)
def test_cleanup_on_exception_kills_children_and_stale_cleanup():
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(2, LinkSpec(100), prefix="lbtb") as tb:
            child = tb.run(0, ["sleep", "30"])
            assert len(_mine(tb.tag)) == 3
            raise RuntimeError("boom")
    assert _mine(tb.tag) == []
    assert child.poll() is not None
    # a namespace named like a testbed of a dead pid is removed, one of a live pid is kept
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"lbtb{dead.pid}-h0", f"lbtb{os.getpid()}n999-h0"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = cleanup_stale("lbtb")
        assert stale in removed and live not in removed
        assert stale not in list_namespaces() and live in list_namespaces()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


GLOO = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=40))
    x = torch.arange(1000, dtype=torch.float32) * (rank + 1)
    dist.all_reduce(x)
    print("SUM", float(x.sum()), flush=True)
    dist.destroy_process_group()
""")


@needs_netns
@pytest.mark.timeout(90)
def test_gloo_all_reduce_across_namespaces(tmp_path):
    script = tmp_path / "ar.py"
    script.write_text(GLOO)
    with Testbed(2, LinkSpec(200), prefix="lbtc") as tb:
        procs = []
        for i in range(2):
            env = dict(os.environ, MASTER_ADDR=tb.addr(0), MASTER_PORT="29533",
                       GLOO_SOCKET_IFNAME=tb.ifname(i), OMP_NUM_THREADS="1")
            procs.append(tb.run(i, [sys.executable, str(script), str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=80)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    expect = 3 * sum(range(1000))
    for out in outs:
        assert f"SUM {float(expect)}" in out, out
    assert _mine(tb.tag) == []
