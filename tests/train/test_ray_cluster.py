"""launch/ray_cluster.py against a real Ray cluster started with ``ray start --head`` (not ray.init).

The head runs in a subprocess with its own temp dir (under the repo's ignored ``.ray_tmp/``) and its
own free GCS port. Stopping it: ``ray stop`` kills every Ray process on the machine (other people's
clusters and tests included), so it is not used. The head is started with ``--block``: that
``ray start`` process is the parent of every daemon of this cluster (gcs_server, raylet, monitors;
the raylet parents the agents and the worker processes), and on SIGTERM it shuts them down itself.
Teardown snapshots that process tree (and any process whose command line names this cluster's temp
dir) before signalling, then SIGKILLs whatever of exactly those processes is still alive.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from lowbit.testing import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = Path(sys.executable).with_name("ray")
if not RAY_CLI.exists():
    RAY_CLI = Path(shutil.which("ray") or RAY_CLI)
pytestmark = pytest.mark.skipif(not RAY_CLI.exists(), reason="the `ray` CLI (pip install 'ray[default]') is not installed")

STEPS, WORKERS = 2, 2


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    for k in ("RAY_ADDRESS", "LOWBIT_RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)  # RAY_ADDRESS would override --address; the last makes every process recompile
    return env


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a live process from a later one that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _our_processes(root: int, marker: str) -> dict[int, str]:
    """pid -> start time of ``root``, its descendants, and processes whose command line names ``marker``."""
    parent, named = {}, set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if marker.encode() in (p / "cmdline").read_bytes():
                named.add(int(p.name))
        except (OSError, IndexError, ValueError):
            continue
    ours, frontier = {root} | named, [root, *named]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier and c not in ours]
        ours.update(kids)
        frontier = kids
    return {pid: st for pid in ours if (st := _start_time(pid)) is not None}


def _stop_cluster(proc: subprocess.Popen, marker: str) -> None:
    procs = _our_processes(proc.pid, marker)  # before any signal: orphans get reparented to init
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_start_time(p) == st for p, st in procs.items()):
        time.sleep(0.5)
    for pid, st in procs.items():
        if _start_time(pid) == st:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def head():
    """A Ray head node of 2 CPUs on a free port; yields (port, temp dir). Always stopped afterwards."""
    base = REPO / ".ray_tmp"
    if len(str(base)) > 40:  # Ray's unix socket paths (temp/session_.../sockets/...) must stay < 107 chars
        base = Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    # Its own subdirectory: `ray start` records the head's address in TEMP/ray_current_cluster, and
    # ray.init(_temp_dir=.ray_tmp) (init_local, test_ray_train.py) would join a head recorded in .ray_tmp.
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir=base))
    port = free_port()
    cmd = [str(RAY_CLI), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "Ray runtime started" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.time() + 90
        while not started.wait(0.5):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"`ray start --head` did not start (rc {proc.poll()}):\n{''.join(lines)[-3000:]}")
        yield port, tmp
    finally:
        _stop_cluster(proc, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def _launch(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "ray_cluster.py"), *args], env=_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(240)
def test_launch_trains_on_the_cluster_started_with_ray_start(head, tmp_path):
    port, tmp = head
    out = tmp_path / "run"
    r = _launch("--address", f"127.0.0.1:{port}", "--model", "tiny-bert", "--workers", str(WORKERS),
                "--servers", "1", "--steps", str(STEPS), "--batch-size", "4", "--max-len", "16",
                "--train-subset", "64", "--eval-subset", "32", "--threads-per-rank", "1", "--no-progress",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    try:
        s = json.loads(r.stdout)  # stdout is the summary alone
    except ValueError:
        pytest.fail(f"stdout is not the summary JSON:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}")
    print(r.stderr[-3000:])  # shown when an assertion below fails
    assert s["transport"] == "ray" and s["steps"] == STEPS and s["start_step"] == 0
    assert s["workers"] == WORKERS and s["workers_alive"] == WORKERS and s["servers"] == 1
    # every step: each worker pushes its gradient frames and pulls the weight frames, counted exactly
    assert s["fp32_bytes_up"] == pytest.approx(STEPS * WORKERS * s["fp32_frame_bytes"], rel=0.02)
    assert 0 < s["bytes_up"] < STEPS * WORKERS * s["grad_frame_bytes"]  # row-sparse embedding gradients
    assert s["fp32_bytes_down"] == pytest.approx(STEPS * WORKERS * s["fp32_frame_bytes"], rel=0.02)
    assert 0 < s["bytes_down"] < STEPS * WORKERS * s["weight_frame_bytes"]  # delta-coded weights
    assert s["compression"] > 1.0
    assert 0.0 <= s["accuracy"] <= 1.0 and s["eval_n"] == 32
    assert json.loads((out / "summary.json").read_text()) == s
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    # it joined the cluster started above (no local one of its own) and says where the summary went
    session = [ln for ln in r.stderr.splitlines() if ln.startswith("lowbit: connected to the Ray cluster at ")]
    assert len(session) == 1 and f":{port} " in session[0] and str(tmp) in session[0], r.stderr[-2000:]
    assert list(tmp.glob("session_*/logs/python-core-driver-*")), "the driver did not join this cluster"
    assert f"lowbit: summary written to {out.resolve() / 'summary.json'}" in r.stderr


def _launch_module():
    spec = importlib.util.spec_from_file_location("ray_cluster_launch", REPO / "launch" / "ray_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
def test_address_auto_finds_the_cluster_recorded_in_its_temp_dir(head):
    port, tmp = head
    addr = _launch_module().gcs_address("auto", str(tmp))
    assert addr.rpartition(":")[2] == str(port)


@pytest.mark.timeout(120)
def test_no_cluster_at_the_address_exits_2_without_starting_one(tmp_path, capsys):
    launch = _launch_module()
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match="nothing listens"):
        launch.gcs_address(dead)
    assert launch.main(["--address", dead, "--model", "tiny-bert", "--steps", "1", "--no-progress",
                        "--out", str(tmp_path / "none")]) == 2
    assert "no Ray cluster at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
