"""Errors a user can act on and checkpoints that cannot lie: bad inputs are refused before any rank
starts with one line and exit 2; corrupted, truncated or missing checkpoint files are never loaded;
a killed rank ends the run with one message naming the resume command; SIGTERM stops every rank at a
step boundary with a checkpoint; a resume may change the owners' layout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.train.checkpoint import Checkpointer, check_compatible, fingerprint, write_json
from lowbit.testing import tiny_config
from lowbit.train.config import Config
from lowbit.train.launch import launch_local

TINY = ["--model", "tiny-bert", "--steps", "4", "--batch-size", "4", "--max-len", "16", "--train-subset", "32",
        "--eval-subset", "16", "--workers", "2", "--dropout", "0", "--threads-per-rank", "1", "--no-progress",
        "--timeout", "60"]


def tiny_cfg(out, **over) -> Config:
    return tiny_config(out, {"run": {"train_subset": 32, "eval_subset": 16, "checkpoint_every": 2}}, over)


# ------------------------------------------------------------------------------------- bad inputs

def _bad_inputs(tmp_path):
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text("codec: {w_bitz: 2}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("codec: [w_bits: 2\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--w-bits", "0"], "argument --w-bits: invalid choice: 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--workers", "0"], "workers must be >= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--transport", "foo"], "argument --transport: invalid choice: 'foo'"),
        (["--clip", "nan"], "clip must be a finite number"),
        (["--fault", "garbage"], "fault must look like kill-worker:RANK@STEP"),
        (["--fault", "kill-worker:7@2"], "rank 7 is not a worker rank"),
        (["--config", str(bad_yaml)], "unknown option codec.w_bitz"),
        (["--config", str(broken)], "not valid YAML"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--config", str(tmp_path)], "is not a file"),
        (["--task", "FOO"], "unknown task 'FOO'"),
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--out", str(a_file)], "is a file; it must be a folder"),
        (["--data-dir", str(tmp_path / "nodata")], "is not a folder"),
        (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    ]


def test_every_bad_input_is_one_line_and_exit_2_before_any_rank_starts(tmp_path, capsys):
    for args, needle in _bad_inputs(tmp_path):
        out = tmp_path / "run"
        argv = ["train", *TINY, "--out", str(out), *args] if "--out" not in args else ["train", *TINY, *args]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith(" ")]
        assert code == 2, (args, err)
        assert needle in err, (args, err)
        assert "Traceback" not in err and len(lines) <= 3, (args, err)
        assert not (out / "logs").exists(), args  # no rank was started


def test_task_names_are_forgiving(tmp_path):
    cfg = tiny_cfg(tmp_path, run={"task": "sst2"})
    from lowbit.train.preflight import preflight
    assert preflight(cfg, quiet=True)[0].run.task == "SST-2"


@pytest.mark.timeout(60)
def test_a_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "train", *TINY, "--task", "sst-3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("lowbit: error: unknown task 'sst-3'") and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "train", *TINY, "--task", "sst-3", "--out", str(tmp_path),
                        "--debug"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr


# ------------------------------------------------------------------------------------ checkpoints

def _fake_checkpoint(ck: Checkpointer, step: int, cfg: Config, payload: bytes = b"x" * 1000) -> None:
    from lowbit.train.checkpoint import atomic_write
    rec = atomic_write(ck.shard_path(step, 0), lambda p: p.write_bytes(payload))
    ck.commit(step, {"shard_0.safetensors": rec}, fingerprint(cfg))


def test_resume_point_verifies_and_falls_back(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ck = Checkpointer(tmp_path)
    assert ck.resume_point().step is None and not ck.resume_point().skipped
    for s in (2, 4, 6):
        _fake_checkpoint(ck, s, cfg)
    assert ck.resume_point().step == 6
    p6 = ck.shard_path(6, 0)
    data = bytearray(p6.read_bytes())
    data[500] ^= 0xFF
    p6.write_bytes(bytes(data))  # corrupted: same size, other bytes
    ck.shard_path(4, 0).write_bytes(b"x" * 10)  # truncated
    rp = ck.resume_point()
    assert rp.step == 2
    assert "step 6" in rp.skipped[0] and "does not match its checksum" in rp.skipped[0]
    assert "step 4" in rp.skipped[1] and "truncated" in rp.skipped[1]
    (ck.root / "latest.json").write_text("{not json")
    rp = ck.resume_point()
    assert rp.step == 2 and "unreadable" in rp.skipped[0]
    ck.shard_path(2, 0).unlink()
    rp = ck.resume_point()
    assert rp.step is None and any("is missing" in s for s in rp.skipped)


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ck = Checkpointer(tmp_path)
    for s in (2, 4, 6, 8, 10):
        _fake_checkpoint(ck, s, cfg)
    ck.shard_path(9, 0).parent.mkdir(parents=True)  # a checkpoint that never committed
    assert ck.prune(2, protect={4}) == [2, 6, 9]
    assert ck.steps() == [10, 8, 4]


def test_an_incompatible_checkpoint_names_both_values(tmp_path):
    saved = fingerprint(tiny_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"codec.w_bits = 32, this run has 2"):
        check_compatible(saved, tiny_cfg(tmp_path, codec={"w_bits": 2}), "checkpoint X")
    with pytest.raises(ConfigError, match=r"model 'tiny-bert', this run has 'roberta-tiny'"):
        check_compatible(saved, tiny_cfg(tmp_path, run={"model": "roberta-tiny"}), "checkpoint X")
    ef = fingerprint(tiny_cfg(tmp_path, codec={"error_feedback": True}))
    with pytest.raises(ConfigError, match=r"written by 2 workers with error feedback, this run has 4"):
        check_compatible(ef, tiny_cfg(tmp_path, codec={"error_feedback": True}, transport={"workers": 4}), "X")
    check_compatible(saved, tiny_cfg(tmp_path, transport={"kind": "ps", "servers": 2, "workers": 3}), "X")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-step ring run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "a"
    launch_local(tiny_cfg(out))
    return out


def _weights(out, step):
    return Checkpointer(out).weights(step)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "logs", ignore_errors=True)
    return dst


@pytest.mark.timeout(240)
@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_checkpoint_is_never_loaded(tmp_path, reference_run, damage, capsys):
    """100 bytes flipped in step 4's shard, or the shard truncated: --resume names the file and
    continues from step 2; with two steps left it ends exactly where the reference run ends."""
    out = _copy_run(reference_run, tmp_path / "b")
    shard = Checkpointer(out).shard_path(4, 0)
    data = bytearray(shard.read_bytes())
    if damage == "corrupt":
        for i in range(1000, 1100):
            data[i] ^= 0xA5
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    s = launch_local(tiny_cfg(out, run={"resume": True}))
    err = capsys.readouterr().err
    assert s["start_step"] == 2
    assert f"passing over step 4: {shard}" in err and f"resuming from {out}/ckpt/step_2" in err
    ref, got = _weights(reference_run, 4), _weights(out, 4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)


@pytest.mark.timeout(240)
def test_an_unreadable_latest_json_falls_back_to_the_step_folders(tmp_path, reference_run, capsys):
    out = _copy_run(reference_run, tmp_path / "l")
    (out / "ckpt" / "latest.json").write_text("garbage")
    s = launch_local(tiny_cfg(out, run={"resume": True, "steps": 5}))
    assert s["start_step"] == 4
    assert "latest.json is unreadable: scanning the step folders" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_resume_with_nothing_to_resume_says_so_and_starts_at_0(tmp_path, capsys):
    s = launch_local(tiny_cfg(tmp_path / "fresh", run={"resume": True, "steps": 2}))
    assert s["start_step"] == 0
    assert "no checkpoint under" in capsys.readouterr().err


def test_nothing_verifies_is_exit_2(tmp_path, reference_run, capsys):
    out = _copy_run(reference_run, tmp_path / "c")
    for s in (2, 4):
        Checkpointer(out).shard_path(s, 0).write_bytes(b"")
    code = main(["train", *TINY, "--out", str(out), "--resume", "--w-bits", "32", "--g-bits", "32",
                 "--embed-bits", "32", "--head-bits", "32", "--lr", "1e-3", "--checkpoint-every", "2"])
    assert code == 2
    assert "no checkpoint under" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_resume_repartitions_the_owners_state(tmp_path, reference_run):
    """A ring run's checkpoint (every rank owns a shard) resumed by a parameter server with two
    servers: each server reads its keys from whichever shard holds them; fp32, so the last two steps
    land where the ring run's did (within the float reordering of another transport)."""
    out = _copy_run(reference_run, tmp_path / "d")
    ck = Checkpointer(out)
    import shutil
    shutil.rmtree(ck.step_dir(4))
    write_json(ck.root / "latest.json", {"step": 2})
    s = launch_local(tiny_cfg(out, run={"resume": True}, transport={"kind": "ps", "servers": 2, "workers": 2}))
    assert s["start_step"] == 2 and s["transport"] == "ps"
    ref, got = _weights(reference_run, 4), _weights(out, 4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- rank failures

def _lowbit(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lowbit.cli", "train", *TINY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def _wait_for_steps(out: Path, n: int, timeout: float = 150) -> None:
    """Until the run under ``out`` has logged ``n`` steps (or ``timeout`` seconds passed)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < n):
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(240)
def test_a_killed_rank_ends_the_run_with_one_message_and_the_resume_command(tmp_path):
    out = tmp_path / "k"
    p = _lowbit("--out", str(out), "--checkpoint-every", "2", "--steps", "6", "--fault", "kill-worker:1@3")
    _, err = p.communicate(timeout=200)
    assert p.returncode == 3, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: training failed: rank 1 exited with code 17 in step 3")
    assert f"{out}/ckpt/step_2" in lines[0] and "--resume" in lines[0] and "rank_R.log" in lines[0]
    assert "Traceback" in (out / "logs" / "rank_0.log").read_text()  # the other rank's error went to its log
    cmd = lines[0].split("resume with: ")[1].split(". Each rank")[0]
    assert cmd.startswith("lowbit train ") and cmd.endswith("--resume") and "--fault" not in cmd


@pytest.mark.timeout(300)
def test_sigterm_on_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path):
    out = tmp_path / "t"
    p = _lowbit("--out", str(out), "--steps", "400", "--checkpoint-every", "1000")
    _wait_for_steps(out, 3)
    kids = _children(p.pid)
    assert len([k for k in kids if Path(f"/proc/{k}").exists()]) >= 2
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert time.time() - t0 < 20
    assert "Traceback" not in err and "leaked" not in err
    step = Checkpointer(out).latest_step()
    assert step is not None and step >= 3 and Checkpointer(out).verify(step)
    assert all(not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text().lower()
               for k in kids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] is True and summary["steps_done"] == step


@pytest.mark.timeout(240)
def test_a_full_disk_while_checkpointing_stops_the_run_naming_it(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) below one shard: the checkpoint cannot be written, every rank
    stops and the launcher says which rank and why."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "f"
    p = _lowbit("--out", str(out), "--checkpoint-every", "2", preexec_fn=limit)
    _, err = p.communicate(timeout=200)
    assert p.returncode == 3, err
    assert "checkpoint of step 2 could not be written" in err and "File too large" in err
    assert Checkpointer(out).latest_step() is None


def test_a_checkpoint_never_committed_is_not_damage(tmp_path):
    """A step folder with shards but no manifest (the write was cut short, e.g. a full disk) is not
    a checkpoint: resume passes over it and, with nothing else, starts at step 0."""
    from lowbit.train.preflight import check_resume
    cfg = tiny_cfg(tmp_path, run={"resume": True})
    ck = Checkpointer(tmp_path)
    ck.shard_path(5, 0).parent.mkdir(parents=True)
    ck.shard_path(5, 0).write_bytes(b"partial")
    assert ck.resume_point().step is None and not ck.resume_point().skipped
    assert check_resume(cfg, quiet=True).step is None
    _fake_checkpoint(ck, 2, cfg)
    assert ck.resume_point().step == 2


@pytest.mark.timeout(240)
def test_a_rank_killed_by_sigkill_from_outside_ends_the_run_with_one_line(tmp_path, bench):
    """A real SIGKILL (not the injected exit): one line naming the rank and the signal, no traceback,
    the last checkpoint and the resume command; no rank left running."""
    faults = bench("faults")
    out = tmp_path / "s"
    p = _lowbit("--out", str(out), "--checkpoint-every", "2", "--steps", "400")
    _wait_for_steps(out, 3)
    family = faults.descendants(p.pid)
    victim = faults.rank_pid(out, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lowbit: training failed: rank 1 was killed by SIGKILL in step ")
    assert "/ckpt/step_" in lines[0] and lines[0].split("resume with: ")[1].split(". Each")[0].endswith("--resume")
    time.sleep(1.0)
    assert not faults.alive(family)
