"""lowbit export --from RUN: the packed file holds the weight frames the workers decoded last, so the
loaded model evaluates bit-identically to the run's own final evaluation."""
import pytest

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.models import load_packed
from lowbit.testing import tiny_config
from lowbit.train.export import export_run
from lowbit.train.launch import launch_local
from lowbit.train.loop import batches, build_model, load_dev
from lowbit.train.plan import make_plan
from lowbit.train.worker import Worker


def _run(out, scheme="none"):
    cfg = tiny_config(out, {"codec": {"w_bits": 2, "g_bits": 3, "embed_bits": 4, "head_bits": 8, "scheme": scheme},
                            "run": {"steps": 4}})
    return cfg, out, launch_local(cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("export") / "run")


def _evaluate(cfg, model):
    _, tok = build_model(cfg)
    return Worker(model, make_plan(model, cfg.codec), 0).evaluate(batches(load_dev(cfg, tok), 64))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_loaded_export_evaluates_like_the_last_worker(run, tmp_path):
    cfg, out, summary = run
    r = export_run(out, tmp_path / "packed.safetensors")
    assert r["step"] == 4 and r["bytes"] < r["fp32_bytes"] / 3
    model = load_packed(r["path"])
    ev = _evaluate(cfg, model)
    assert ev["accuracy"] == summary["accuracy"] and ev["eval_loss"] == summary["eval_loss"]
    # the Transformer matrices hold 2-bit LAQ codes: at most 3 distinct values each
    w = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert len(w.unique()) <= 3


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_export_from_run_and_its_errors(run, tmp_path, capsys):
    _, out, _ = run
    dest = tmp_path / "cli.safetensors"
    assert main(["export", "--from", str(out), "--step", "4", "--out", str(dest)]) == 0
    assert dest.is_file() and "smaller than fp32" in capsys.readouterr().out
    assert main(["export", "--from", str(tmp_path), "--out", str(dest)]) == 2
    assert "not a lowbit run folder" in capsys.readouterr().err
    assert main(["export", "--from", str(out), "--step", "3", "--out", str(dest)]) == 2
    assert main(["export", "--from", str(out), "--checkpoint", "x.safetensors", "--out", str(dest)]) == 2
    assert "takes no --checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty"  # a run folder whose checkpoints were never written
    empty.mkdir()
    (empty / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(ConfigError, match="no checkpoint that verifies"):
        export_run(empty, tmp_path / "x.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["ternarybert", "q8bert"])
def test_scheme_run_exports_the_wrapped_model_its_workers_ran(scheme, tmp_path):
    """A --scheme run: the export is wrapped with the scheme (its activation quantizers; Q8BERT's
    EMA ranges from worker 0) around the workers' low-bit weights."""
    cfg, out, summary = _run(tmp_path / "run", scheme)
    r = export_run(out, tmp_path / "packed.safetensors")
    model = load_packed(r["path"])
    assert model._lowbit_scheme["name"] == scheme
    ev = _evaluate(cfg, model)
    assert ev["accuracy"] == summary["accuracy"] and ev["eval_loss"] == summary["eval_loss"]
