"""The fault table: each fault injected into a real ``lowbit train`` run, per transport, and what came of it.

For every transport (ps, ring, tree, ray) and fault, a run of tiny-bert (2-bit weights, 3-bit
gradients, a checkpoint every 5 steps) is started as a user starts it, in a subprocess, and the fault
is injected from outside: SIGKILL of a worker, of a server (an owner of fp32 state), of the launcher;
SIGTERM on the launcher; a corrupted, truncated or missing shard and an unreadable ``latest.json`` in
the newest checkpoint; a full disk while checkpointing (``RLIMIT_FSIZE``); a worker's link down for
10 s (network namespaces, root only). Each row records after how many seconds the fault was detected,
what the user saw (the launcher's stderr), whether a ``--resume`` ended with final weights equal to
an uninterrupted run's, and the training lost (steps recomputed, and their bytes).

The bad-input table runs ``lowbit train`` with each bad input of :data:`BAD_INPUTS` and records the
exit status, the time it took and the line printed.

    lowbit bench faults                                 # every transport and fault
    lowbit bench faults --transports ring --faults sigkill-worker,corrupt-shard
    lowbit bench faults --docs docs/reliability.md      # also rewrite the tables there

Writes benchmarks/results/faults.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lowbit.benchmarks._common import RESULTS, print_table, write_json

TRANSPORTS = ("ps", "ring", "tree", "ray")
STEPS, EVERY, KILL_AFTER = 30, 5, 12  # steps per run, checkpoint interval, steps done before a signal
ORPHAN_WAIT_S = 30.0  # how long after the launcher's exit its processes may take to go
FAULTS = ("sigkill-worker", "sigkill-server", "sigkill-launcher", "sigterm-launcher", "corrupt-shard",
          "truncated-shard", "missing-shard", "bad-latest", "disk-full", "link-down-10s")


def train_args(transport: str, out: Path, steps: int = STEPS) -> list[str]:
    servers = ["--servers", "1"] if transport in ("ps", "ray") else []
    return ["--transport", transport, "--workers", "2", *servers, "--model", "tiny-bert", "--steps", str(steps),
            "--batch-size", "4", "--max-len", "16", "--train-subset", "64", "--eval-subset", "32", "--dropout", "0",
            "--w-bits", "2", "--g-bits", "3", "--lr", "1e-3", "--threads-per-rank", "1", "--timeout", "60",
            "--checkpoint-every", str(EVERY), "--no-progress", "--out", str(out)]


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what, extra ``lowbit train`` arguments, text the error must hold) for each bad input."""
    typo, broken, a_file = tmp / "typo.yaml", tmp / "broken.yaml", tmp / "a_file"
    typo.write_text("codec: {w_bitz: 2}\n")
    broken.write_text("codec: [w_bits: 2\n")
    a_file.write_text("x")
    return [
        ("bit width out of range", ["--w-bits", "0"], "argument --w-bits: invalid choice: 0"),
        ("negative learning rate", ["--lr", "-1"], "lr must be > 0"),
        ("NaN learning rate", ["--lr", "nan"], "lr must be a finite number"),
        ("zero steps", ["--steps", "0"], "steps must be >= 1"),
        ("zero workers", ["--workers", "0"], "workers must be >= 1"),
        ("zero batch size", ["--batch-size", "0"], "batch_size must be >= 1"),
        ("unknown transport", ["--transport", "foo"], "argument --transport: invalid choice: 'foo'"),
        ("NaN clip", ["--clip", "nan"], "clip must be a finite number"),
        ("malformed fault spec", ["--fault", "garbage"], "fault must look like kill-worker:RANK@STEP"),
        ("fault on a rank that is no worker", ["--fault", "kill-worker:7@2"], "rank 7 is not a worker rank"),
        ("typo in a YAML option", ["--config", str(typo)], "unknown option codec.w_bitz"),
        ("YAML that does not parse", ["--config", str(broken)], "not valid YAML"),
        ("missing --config file", ["--config", str(tmp / "missing.yaml")], "does not exist"),
        ("--config is a folder", ["--config", str(tmp)], "is not a file"),
        ("unknown task", ["--task", "FOO"], "unknown task 'FOO'"),
        ("unknown model", ["--model", "nosuch"], "unknown model 'nosuch'"),
        ("--out is a file", ["--out", str(a_file)], "is a file; it must be a folder"),
        ("--data-dir missing", ["--data-dir", str(tmp / "nodata")], "is not a folder"),
        ("--keep-checkpoints 0", ["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
        ("tree with 3 ranks", ["--transport", "tree", "--workers", "3"], "power-of-two"),
        ("continue mode on a ring", ["--transport", "ring", "--on-worker-failure", "continue"],
         "on_worker_failure=continue needs the ps transport"),
    ]


# ------------------------------------------------------------------------------------------ processes

class Launch:
    """``lowbit train ARGS`` as a user runs it: a subprocess whose stderr lines are kept with the time
    they arrived (seconds since the start)."""

    def __init__(self, args: list[str], env: dict | None = None, preexec_fn=None, argv: list[str] | None = None):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv or [sys.executable, "-m", "lowbit.cli", "train", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env or _env(), preexec_fn=preexec_fn)
        self.err: list[tuple[float, str]] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.p.stderr, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.p.stdout, False), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, fh, is_err: bool) -> None:
        for line in fh:
            if is_err:
                self.err.append((time.monotonic() - self.t0, line.rstrip("\n")))
            else:
                self.out.append(line)

    def wait(self, timeout: float) -> tuple[int, float]:
        """(exit status, seconds since the start); the process is killed past ``timeout``."""
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.p.pid)
            rc = self.p.wait()
        for t in self._readers:
            t.join(5)
        return rc, time.monotonic() - self.t0

    def said(self) -> str:
        """What the user saw on stderr (lines joined with ' / ')."""
        return " / ".join(line for _, line in self.err if line.strip())

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.err if needle in line), None)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled")


def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    ppid, out, todo = _ppids(), [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in ppid.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pids) -> list[int]:
    def running(p):
        try:
            return "zombie" not in Path(f"/proc/{p}/status").read_text().lower()
        except OSError:
            return False
    return [p for p in pids if running(p)]


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def rank_pid(out: Path, rank: int) -> int | None:
    """The process that writes ``OUT/logs/rank_R.log`` (a rank of ``launch_local``, or a Ray rank's actor)."""
    log = str((out / "logs" / f"rank_{rank}.log").resolve())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(f) == log for f in (d / "fd").iterdir()):
                return int(d.name)
        except OSError:
            continue
    return None


def steps_logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_steps(out: Path, n: int, launch: Launch, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launch.p.poll() is None:
        if steps_logged(out) >= n:
            return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------------------- outcomes

def final_weights(out: Path, step: int = STEPS):
    from lowbit.train.checkpoint import Checkpointer
    return Checkpointer(out).weights(step)


def same_weights(a: Path, b: Path) -> bool:
    import torch
    try:
        wa, wb = final_weights(a), final_weights(b)
    except Exception:  # noqa: BLE001 - no final checkpoint: not resumed exactly
        return False
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def step_bytes(out: Path) -> float:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r["bytes_up"] + r["bytes_down"] for r in recs) / max(1, len(recs))


def resume(transport: str, out: Path, ref: Path, timeout: float) -> tuple[dict, Launch]:
    """``--resume`` to the end: where it started, what it said, whether it ended on the reference's
    weights (and the launch, for what it printed when)."""
    la = Launch(train_args(transport, out) + ["--resume"])
    rc, wall = la.wait(timeout)
    start = None
    try:
        start = json.loads((out / "summary.json").read_text())["start_step"]
    except (OSError, ValueError, KeyError):
        pass
    return {"resume_rc": rc, "resume_start": start, "resume_said": la.said(),
            "resumed_exactly": rc == 0 and same_weights(out, ref)}, la


# -------------------------------------------------------------------------------------------- faults

def process_fault(fault: str, transport: str, out: Path, ref: Path, timeout: float) -> dict:
    """A signal to a rank, an actor or the launcher once KILL_AFTER steps are logged; then --resume
    when the run stopped."""
    la = Launch(train_args(transport, out))
    if not wait_steps(out, KILL_AFTER, la):
        la.wait(5)
        return {"note": f"the run did not reach step {KILL_AFTER}: {la.said()[-200:]}"}
    if fault in ("sigkill-launcher", "sigterm-launcher"):
        target = la.p.pid
        sig = signal.SIGKILL if fault == "sigkill-launcher" else signal.SIGTERM
    else:  # ps and ray: rank 0 is the server, ranks 1-2 workers; ring/tree: every rank owns a shard
        rank = {"sigkill-worker": 2 if transport in ("ps", "ray") else 1, "sigkill-server": 0}[fault]
        target, sig = rank_pid(out, rank), signal.SIGKILL
    if target is None:
        kill_tree(la.p.pid)
        la.wait(10)
        return {"note": "no process to signal was found"}
    family = descendants(la.p.pid)
    done_at_signal = steps_logged(out)
    t_sig = time.monotonic() - la.t0
    os.kill(target, sig)
    rc, t_end = la.wait(timeout)
    while alive(family) and time.monotonic() - la.t0 < t_end + ORPHAN_WAIT_S:
        time.sleep(0.1)
    gone_s = round(time.monotonic() - la.t0 - t_sig, 1)
    orphans = alive(family)
    for p in orphans:  # leave nothing behind for the next row
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    row = {"rc": rc, "detected_s": round(t_end - t_sig, 2), "said": la.said() or "(nothing)",
           "processes_left": len(orphans), "all_gone_after_s": None if orphans else gone_s,
           "steps_done_at_fault": done_at_signal}
    if rc == 0 and steps_logged(out) >= STEPS:  # survived without a restart (Ray replaces a worker)
        row.update(survived=True, resumed_exactly=same_weights(out, ref), steps_lost=0)
        return row
    row.update(survived=False, **resume(transport, out, ref, timeout)[0])
    if row["resume_start"] is not None:
        row["steps_lost"] = max(0, done_at_signal - row["resume_start"])
    return row


def _stopped_after(src: Path, dst: Path, step: int) -> None:
    """``dst``: ``src``'s run as if it had stopped right after step ``step`` (its later checkpoints gone)."""
    from lowbit.train.checkpoint import Checkpointer, write_json as write_latest
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "logs", ignore_errors=True)
    ck = Checkpointer(dst)
    for s in ck.steps():
        if s > step:
            shutil.rmtree(ck.step_dir(s))
    write_latest(ck.root / "latest.json", {"step": step})
    recs = (dst / "metrics.jsonl").read_text().splitlines()[:step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in recs))


def checkpoint_fault(fault: str, transport: str, out: Path, ref: Path, timeout: float) -> dict:
    """The reference run stopped after step STEPS - EVERY, its newest checkpoint damaged, then --resume."""
    from lowbit.train.checkpoint import Checkpointer
    last = STEPS - EVERY
    _stopped_after(ref, out, last)
    ck = Checkpointer(out)
    shard = ck.shard_files(last)[0]
    if fault == "corrupt-shard":
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 100):
            data[i] ^= 0xA5
        shard.write_bytes(bytes(data))
    elif fault == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif fault == "missing-shard":
        shard.unlink()
    else:  # bad-latest
        (ck.root / "latest.json").write_text("{\"step\": ")
    row, la = resume(transport, out, ref, timeout)
    said = [line for _, line in la.err if "--resume" in line]
    t, start = la.first("passing over"), row["resume_start"]
    return {**row, "rc": row["resume_rc"], "detected_s": round(t, 2) if t is not None else None,
            "said": " / ".join(said) or la.said(), "survived": False,
            "steps_lost": (last - start) if start is not None else None}


def disk_full(transport: str, out: Path, ref: Path, timeout: float) -> dict:
    """A file-size limit below one shard: the first checkpoint cannot be written."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    la = Launch(train_args(transport, out), preexec_fn=limit)
    first = None
    while la.p.poll() is None:
        if first is None and steps_logged(out) >= EVERY:
            first = time.monotonic() - la.t0
        time.sleep(0.02)
    rc, t_end = la.wait(timeout)
    row = {"rc": rc, "detected_s": round(t_end - first, 2) if first else None, "said": la.said() or "(nothing)",
           "survived": False, "steps_done_at_fault": steps_logged(out)}
    row.update(resume(transport, out, ref, timeout)[0])
    if row["resume_start"] is not None:
        row["steps_lost"] = max(0, row["steps_done_at_fault"] - row["resume_start"])
    return row


def link_down(transport: str, out: Path, ref: Path, timeout: float) -> dict:
    """Ranks in network namespaces (one host each, ``python -m lowbit.train`` as torchrun starts it);
    a worker's interface down for 10 s once KILL_AFTER steps are logged."""
    from lowbit.net.netns import LinkSpec, Testbed, netns_available
    from lowbit.testing import free_port

    ok, why = netns_available()
    if not ok:
        return {"note": f"skipped: {why}"}
    world = 3 if transport == "ps" else 2
    victim = world - 1
    with Testbed(world, LinkSpec(None)) as tb:
        port = free_port()
        procs = []
        for r in range(world):
            env = dict(_env(), RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=tb.addr(0),
                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=tb.ifname(r))
            args = train_args(transport, out, STEPS)
            procs.append(Launch([], env=env, argv=tb.exec_argv(r, [sys.executable, "-m", "lowbit.train", *args])))
        lead = procs[-1]
        t0 = time.monotonic()
        reached = wait_steps(out, KILL_AFTER, lead)
        t_down = None
        if reached:
            t_down = time.monotonic()
            subprocess.run(["ip", "-n", tb.hosts[victim], "link", "set", tb.ifname(victim), "down"], check=True)
            time.sleep(10)
            subprocess.run(["ip", "-n", tb.hosts[victim], "link", "set", tb.ifname(victim), "up"], check=True)
        rcs = [p.wait(timeout)[0] for p in procs]
        t_end = time.monotonic()
    ok = all(rc == 0 for rc in rcs) and steps_logged(out) >= STEPS
    said = " / ".join(line for p in procs for _, line in p.err if line.startswith("lowbit"))
    return {"rc": max(rcs, key=abs), "survived": ok, "detected_s": None,
            "said": said or "(nothing: the run went on)", "resumed_exactly": ok and same_weights(out, ref),
            "steps_lost": 0 if ok else None, "wall_s": round(t_end - t0, 1),
            "note": None if reached else "the run ended before the link went down",
            "down_s": 10 if t_down else 0}


def run_fault(fault: str, transport: str, work: Path, ref: Path, timeout: float) -> dict:
    out = work / f"{transport}-{fault}"
    if fault.startswith("sig"):
        row = process_fault(fault, transport, out, ref, timeout)
    elif fault in ("corrupt-shard", "truncated-shard", "missing-shard", "bad-latest"):
        row = checkpoint_fault(fault, transport, out, ref, timeout)
    elif fault == "disk-full":
        row = disk_full(transport, out, ref, timeout)
    elif transport == "ray":
        row = {"note": "not applicable: the local Ray cluster runs on one host"}
    else:
        row = link_down(transport, out, ref, timeout)
    args = shlex.join(train_args(transport, out))
    for k in ("said", "resume_said"):  # the run's folder as OUT, its flags as ARGS, the install as VENV
        if isinstance(row.get(k), str):
            row[k] = row[k].replace(args, "ARGS").replace(str(out), "OUT").replace(sys.prefix, "VENV")
    return row


# -------------------------------------------------------------------------------------------- tables

def run_bad_inputs(tmp: Path) -> list[dict]:
    rows = []
    for what, extra, needle in bad_inputs(tmp):
        out = tmp / "bad-run"
        args = train_args("ring", out) + extra
        la = Launch(args)
        rc, wall = la.wait(120)
        lines = [line for _, line in la.err if line.strip() and not line.startswith(("usage:", " "))]
        rows.append({"input": what, "args": " ".join(extra).replace(str(tmp), "TMP"), "rc": rc,
                     "s": round(wall, 1), "lines": len(lines), "printed": " / ".join(lines).replace(str(tmp), "TMP"),
                     "expected": needle in la.said(), "ranks_started": (out / "logs").exists()})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def fault_markdown(rows: list[dict]) -> str:
    head = ("| transport | fault | detected after | the user saw | resumed exactly | training lost |\n"
            "|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r.get("note") and "rc" not in r:
            lines.append(f"| {r['transport']} | {r['fault']} | - | {r['note']} | - | - |")
            continue
        det = f"{r['detected_s']} s" if r.get("detected_s") is not None and not r.get("survived") else "-"
        parts = [p for p in r.get("said", "").split(" / ") if p]
        ours = [p for p in parts if p.startswith("lowbit")] or parts[:1]
        said = " / ".join(ours)
        said = (said[:220] + " ...") if len(said) > 220 else said
        if len(parts) > len(ours):
            said += f" (and {len(parts) - len(ours)} line(s) of Ray's own log)"
        said = said.replace("|", "\\|") + f" (exit {r.get('rc')})"
        if r.get("processes_left"):
            said += f"; {r['processes_left']} processes still running {ORPHAN_WAIT_S:.0f} s after the exit"
        elif r.get("all_gone_after_s") is not None and r["all_gone_after_s"] > r.get("detected_s", 0) + 1:
            said += f"; its processes gone {r['all_gone_after_s']} s after the signal"
        if r.get("survived"):
            exact = "survived, no restart; " + ("weights identical" if r.get("resumed_exactly") else "weights differ")
        else:
            exact = ("yes" if r.get("resumed_exactly") else "no") + (f", from step {r['resume_start']}"
                                                                    if r.get("resume_start") is not None else "")
        lost = r.get("steps_lost")
        lost_s = "-" if lost is None else f"{lost} steps ({lost * r.get('step_bytes', 0) / 1e6:.1f} MB)"
        lines.append(f"| {r['transport']} | {r['fault']} | {det} | {said} | {exact} | {lost_s} |")
    return head + "\n".join(lines) + "\n"


def bad_input_markdown(rows: list[dict]) -> str:
    head = "| bad input | arguments | exit | seconds | printed |\n|---|---|---|---|---|\n"
    return head + "\n".join(f"| {r['input']} | `{r['args']}` | {r['rc']} | {r['s']} | {r['printed'].replace('|', chr(92) + '|')} |"
                            for r in rows) + "\n"


def rewrite_docs(path: Path, faults_md: str | None, bad_md: str | None, command: str) -> None:
    text = path.read_text()
    for tag, md in (("faults", faults_md), ("bad-inputs", bad_md)):
        if md is None:
            continue
        begin, end = f"<!-- {tag}: generated by lowbit bench faults -->", f"<!-- end {tag} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{path} has no {begin} ... {end} section")
        a, rest = text.split(begin, 1)
        _, b = rest.split(end, 1)
        text = a + begin + f"\n\n`{command}`\n\n" + md + "\n" + end + b
    path.write_text(text)
    print(f"rewrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit bench faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated, of " + ", ".join(TRANSPORTS))
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, of " + ", ".join(FAULTS))
    ap.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input table")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    ap.add_argument("--docs", default="", help="also rewrite the tables in this markdown file")
    ap.add_argument("--from-json", default="", help="only rewrite --docs from this JSON of an earlier run")
    ap.add_argument("--include", default="", help="JSON of an earlier run: its rows join this run's (rows this "
                    "run measures again are replaced), e.g. to rerun one transport")
    ap.add_argument("--json", default=str(RESULTS / "faults.json"))
    args = ap.parse_args(argv)
    transports, faults = [x for x in args.transports.split(",") if x], args.faults.split(",")
    for x in transports:
        if x not in TRANSPORTS:
            ap.error(f"unknown transport {x!r}; one of {', '.join(TRANSPORTS)}")
    for x in faults:
        if x not in FAULTS:
            ap.error(f"unknown fault {x!r}; one of {', '.join(FAULTS)}")
    command = "lowbit bench faults " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        rewrite_docs(Path(args.docs), fault_markdown(old["records"]), bad_input_markdown(old["bad_inputs"]),
                     old["command"])
        return 0
    t0 = time.time()
    rows, bad = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-faults-") as tmp:
        work = Path(tmp)
        if not args.no_bad_inputs:
            bad = run_bad_inputs(work)
            print_table(bad, ["input", "rc", "s", "lines", "printed"])
        for transport in transports:
            ref = work / f"{transport}-reference"
            la = Launch(train_args(transport, ref))
            rc, wall = la.wait(args.timeout)
            if rc != 0:
                raise SystemExit(f"the reference {transport} run failed: {la.said()[-400:]}")
            sb = step_bytes(ref)
            for fault in faults:
                print(f"{transport} {fault} ...", flush=True)
                row = {"transport": transport, "fault": fault, "step_bytes": sb, **run_fault(fault, transport, work, ref,
                                                                                            args.timeout)}
                rows.append(row)
                print(json.dumps(row)[:400], flush=True)
    if args.include:
        old = json.loads(Path(args.include).read_text())
        done = {(r["transport"], r["fault"]) for r in rows}
        rows = [r for r in old["records"] if (r["transport"], r["fault"]) not in done] + rows
        rows.sort(key=lambda r: (TRANSPORTS.index(r["transport"]), FAULTS.index(r["fault"])))
        bad = bad or old.get("bad_inputs", [])
        command += f" (rows of {old.get('command', args.include)} kept)"
    print_table(rows, ["transport", "fault", "rc", "detected_s", "survived", "resumed_exactly", "steps_lost"])
    write_json(args.json, rows, {"bad_inputs": bad, "command": command, "steps": STEPS, "checkpoint_every": EVERY,
                                 "wall_s": round(time.time() - t0, 1)})
    if args.docs:
        rewrite_docs(Path(args.docs), fault_markdown(rows) if rows else None,
                     bad_input_markdown(bad) if bad else None, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
