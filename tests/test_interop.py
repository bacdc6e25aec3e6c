"""SAELens and Gemma Scope 2 layouts, both ways: bit-exact round trips, hand-made released files,
one-line errors; the site -> hook names; the Hub directory; the Neuronpedia statistics."""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import jumprelu
from jumprelu.export import gemma_scope, gemma_scope_2, hooks, hub, neuronpedia, saelens, tensors
from jumprelu.export.tensors import FormatError
from jumprelu.train.loop import train
from tests.test_train import ROOT


def _run_export(workdir, out, *flags):
    cmd = [sys.executable, "-m", "jumprelu", "export", str(workdir), str(out), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _export(workdir, out, *flags):
    cli = _run_export(workdir, out, *flags)
    assert cli.returncode == 0, cli.stderr
    return cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import make_tiny_config

    cfg = make_tiny_config()
    wd = tmp_path_factory.mktemp("run")
    train(cfg, str(wd))
    return wd


def _same_computation(a, b, x):
    np.testing.assert_array_equal(np.asarray(a.encode(x)), np.asarray(b.encode(x)))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


@pytest.mark.parametrize("fmt", ["saelens", "gemma-scope-2", "gemma-scope"])  # gemma-scope: an npz named "out"
def test_export_then_load_is_bit_exact(trained, tmp_path, fmt):
    ours = jumprelu.load(str(trained))
    out = tmp_path / "out"
    _export(trained, out, "--format", fmt)
    theirs = jumprelu.load(str(out))
    for name in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        np.testing.assert_array_equal(np.asarray(getattr(theirs, name)), np.asarray(getattr(ours, name)))
    x = np.random.default_rng(1).normal(size=(64, ours.d_model)).astype(np.float32) * ours.scale
    _same_computation(ours, theirs, x)
    if fmt == "gemma-scope":
        return
    weights = "sae_weights.safetensors" if fmt == "saelens" else "params.safetensors"
    _same_computation(ours, jumprelu.load(str(out / weights)), x)  # the weights file names its folder


def test_saelens_directory_holds_exactly_the_released_layout(trained, tmp_path):
    from safetensors.numpy import load_file

    sae = jumprelu.load(str(trained))
    saelens.export(sae, str(tmp_path / "sl"))
    weights = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert weights["W_enc"].shape == (32, 64) and weights["W_dec"].shape == (64, 32)
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in weights.values())
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (32, 64)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["metadata"]["sae_lens_version"] >= "6.0.0"
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path"):
        assert key in cfg["metadata"]
    assert cfg["metadata"]["model_name"] == "synthetic"
    # SAEBench expects unit-norm decoder rows; ours are.
    np.testing.assert_allclose(np.linalg.norm(weights["W_dec"], axis=1), 1.0, atol=1e-5)


def test_gemma_scope_2_folder_holds_exactly_the_released_layout(trained, tmp_path):
    _export(trained, tmp_path / "gs2", "--format", "gemma-scope-2")
    weights = tensors.read(str(tmp_path / "gs2" / "params.safetensors"))
    assert sorted(weights) == ["b_dec", "b_enc", "threshold", "w_dec", "w_enc"]
    cfg = json.loads((tmp_path / "gs2" / "config.json").read_text())
    keys = ["hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0", "affine_connection"]
    assert sorted(cfg) == sorted([*keys, "type"])
    report = json.loads((trained / "report.json").read_text())
    assert cfg["architecture"] == "jump_relu" and cfg["type"] == "sae" and cfg["width"] == 64
    assert cfg["l0"] == round(report["eval"]["l0"]) and cfg["affine_connection"] is False


def test_gemma_scope_2_l0_and_the_model_card_are_of_the_exported_step_or_refit(trained, tmp_path):
    """--step N and a refit's params.npz record that SAE's held-out L0, not the final report's."""
    import shutil

    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    report = json.loads((run / "report.json").read_text())
    report["eval"]["l0"] = 999.0  # the final step's L0, marked so that a copy of it shows
    (run / "report.json").write_text(json.dumps(report))
    early = evaluate_workdir(str(run), step=20)[1]["stored"]["l0"]
    for step, want in ((20, round(early)), (report["steps"], 999)):
        _export(run, tmp_path / f"gs2-{step}", "--format", "gemma-scope-2", "--step", str(step))
        assert json.loads((tmp_path / f"gs2-{step}" / "config.json").read_text())["l0"] == want
    from jumprelu.cli.export import held_out_eval

    sae = jumprelu.load(str(run), step=20)  # what `export --step 20 --hub` writes before pushing
    hub.write_repo_dir(sae, str(tmp_path / "hub"), "user/repo", {"eval": held_out_eval(str(run), sae, None)})
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"| held-out L0 | {early:.4g} |" in card and "999" not in card
    after = refit_workdir(str(run), None, rows=2048, ridge=1e-6)["after"]["l0"]
    _export(run / "refit" / "params.npz", tmp_path / "refit", "--format", "gemma-scope-2")
    assert json.loads((tmp_path / "refit" / "config.json").read_text())["l0"] == round(after) > 0


def _random(rng, d=16, m=48, d_out=None):
    d_out = d_out or d
    return {
        "W_enc": rng.normal(size=(d, m)).astype(np.float32),
        "W_dec": rng.normal(size=(m, d_out)).astype(np.float32),
        "b_enc": rng.normal(size=m).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(size=m)).astype(np.float32),
    }


def _saelens_cfg(d, m, **kw):
    return {"architecture": "jumprelu", "d_in": d, "d_sae": m, "dtype": "float32", **kw}


def test_hand_made_saelens_jumprelu_with_b_dec_subtraction(tmp_path):
    """SAELens's own default: h = (x - b_dec) W_enc + b_enc, f = ReLU(h)·[h > θ]."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = _random(rng)
    p["threshold"][:5] = -0.5  # ReLU still applies below zero
    save_file(p, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(_saelens_cfg(16, 48, apply_b_dec_to_input=True)))
    sae = jumprelu.load(str(tmp_path))
    x = rng.normal(size=(32, 16)).astype(np.float32) * 3
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = np.maximum(h, 0) * (h > p["threshold"])
    np.testing.assert_allclose(np.asarray(sae.encode(x)), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sae(x)), f @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-3)
    assert 0 < (f > 0).mean() < 1


def test_hand_made_saelens_topk_and_batchtopk(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = _random(rng)
    thr = p.pop("threshold")
    (tmp_path / "topk").mkdir()
    save_file(p, str(tmp_path / "topk" / "sae_weights.safetensors"))
    cfg = _saelens_cfg(16, 48, architecture="topk", k=5, apply_b_dec_to_input=False)
    (tmp_path / "topk" / "cfg.json").write_text(json.dumps(cfg))
    sae = jumprelu.load(str(tmp_path / "topk"))
    assert sae.k == 5
    x = rng.normal(size=(32, 16)).astype(np.float32)
    h = x @ p["W_enc"] + p["b_enc"]
    kth = np.sort(h, axis=1)[:, -5:-4]
    f = np.where((h >= kth) & (h > 0), h, 0)
    np.testing.assert_allclose(np.asarray(sae.encode(x)), f, rtol=1e-5, atol=1e-5)
    # A TopK SAE that ranks by decoder-norm-scaled pre-activations (SAELens's TopK training default;
    # was refused): h·‖W_dec,i‖ ranked, decoded as f_i/‖W_dec,i‖
    cfg.update(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)
    (tmp_path / "topk" / "cfg.json").write_text(json.dumps(cfg))
    rescaled = jumprelu.load(str(tmp_path / "topk"))
    norms = np.linalg.norm(p["W_dec"], axis=1)
    h = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]) * norms
    kth = np.sort(h, axis=1)[:, -5:-4]
    f = np.where((h >= kth) & (h > 0), h, 0)
    np.testing.assert_allclose(np.asarray(rescaled.encode(x)), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(rescaled(x)), (f / norms) @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4)
    save_file(
        dict(p, W_dec=np.where(np.arange(48)[:, None] == 3, 0, p["W_dec"])),
        str(tmp_path / "topk" / "sae_weights.safetensors"),
    )
    with pytest.raises(FormatError, match="W_dec has a zero row, which rescale_acts_by_decoder_norm divides by"):
        jumprelu.load(str(tmp_path / "topk"))
    # SAELens saves BatchTopK as JumpReLU with one threshold for every latent.
    (tmp_path / "btk").mkdir()
    save_file(dict(p, threshold=np.full_like(thr, 0.7)), str(tmp_path / "btk" / "sae_weights.safetensors"))
    meta = {"sae_lens_version": "6.54.12", "training_architecture": "batchtopk"}
    (tmp_path / "btk" / "cfg.json").write_text(json.dumps(_saelens_cfg(16, 48, metadata=meta)))
    btk = jumprelu.load(str(tmp_path / "btk"))
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    np.testing.assert_allclose(np.asarray(btk.encode(x)), np.where(h > 0.7, h, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [False, True])
def test_hand_made_gemma_scope_2_sae_and_transcoder(tmp_path, affine):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d_out = 24 if affine else 16
    p = _random(rng, d_out=d_out)
    arrays = {k.lower(): v for k, v in p.items()}
    if affine:
        arrays["affine_skip_connection"] = rng.normal(size=(16, d_out)).astype(np.float32)
    save_file(arrays, str(tmp_path / "params.safetensors"))
    cfg = {
        "hf_hook_point_in": "model.layers.3.output",
        "hf_hook_point_out": "model.layers.3.output",
        "width": 48,
        "model_name": "google/gemma-3-1b-pt",
        "architecture": "jump_relu",
        "l0": 12,
        "affine_connection": affine,
        "type": "transcoder" if affine else "sae",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for path in (tmp_path, tmp_path / "params.safetensors"):
        sae = jumprelu.load(str(path))
        x = rng.normal(size=(32, 16)).astype(np.float32) * 3
        h = x @ p["W_enc"] + p["b_enc"]
        f = np.maximum(h, 0) * (h > p["threshold"])
        want = f @ p["W_dec"] + p["b_dec"] + (x @ arrays["affine_skip_connection"] if affine else 0)
        np.testing.assert_allclose(np.asarray(sae.encode(x)), f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sae(x)), want, rtol=1e-4, atol=1e-3)


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


def test_bad_saelens_and_gemma_scope_2_files_give_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = _random(rng)

    def saelens_dir(name, arrays, **cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(arrays, str(d / "sae_weights.safetensors"))
        (d / "cfg.json").write_text(json.dumps(_saelens_cfg(16, 48, **cfg)))
        return str(d)

    missing = {k: v for k, v in p.items() if k != "threshold"}
    with pytest.raises(FormatError) as e:
        jumprelu.load(saelens_dir("missing", missing))
    _one_line(e, "missing", "sae_weights.safetensors", "missing keys ['threshold']")
    with pytest.raises(FormatError) as e:
        jumprelu.load(saelens_dir("extra", dict(p, W_skip=np.zeros((16, 16), np.float32))))
    _one_line(e, "unexpected keys ['W_skip']")
    with pytest.raises(FormatError) as e:
        jumprelu.load(saelens_dir("shape", dict(p, b_dec=np.zeros(17, np.float32))))
    _one_line(e, "b_dec has shape [17], expected [16]")
    with pytest.raises(FormatError) as e:
        jumprelu.load(saelens_dir("norm", p, normalize_activations="expected_average_only_in"))
    _one_line(e, "normalize_activations")
    with pytest.raises(FormatError) as e:
        jumprelu.load(saelens_dir("arch", p, architecture="gated"))
    _one_line(e, "architecture 'gated'")
    bad = tmp_path / "notjson"
    bad.mkdir()
    (bad / "cfg.json").write_text("{")
    save_file(p, str(bad / "sae_weights.safetensors"))
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(bad))
    _one_line(e, "cfg.json: not readable JSON")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "params.safetensors").write_bytes(b"\x80\x04pickle-ish bytes")
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(garbage))
    _one_line(e, "not a readable .safetensors file")

    gs2 = tmp_path / "gs2"
    gs2.mkdir()
    lower = {k.lower(): v for k, v in p.items()}
    save_file({k: v for k, v in lower.items() if k != "b_enc"}, str(gs2 / "params.safetensors"))
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(gs2))
    _one_line(e, "params.safetensors", "missing keys ['b_enc']")
    save_file(dict(lower, W_enc=p["W_enc"]), str(gs2 / "params.safetensors"))
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(gs2))
    _one_line(e, "unexpected keys ['W_enc']")
    save_file(dict(lower, threshold=np.zeros(47, np.float32)), str(gs2 / "params.safetensors"))
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(gs2))
    _one_line(e, "threshold has shape [47], expected [48]")
    save_file(dict(lower, w_enc=lower["w_enc"].ravel()), str(gs2 / "params.safetensors"))
    with pytest.raises(FormatError) as e:
        jumprelu.load(str(gs2))
    _one_line(e, "w_enc and w_dec must be 2-D, found [768] and [48, 16]")
    save_file(lower, str(gs2 / "params.safetensors"))
    for text, part in (
        ("[1, 2]", "expected a JSON object"),
        ('{"width": "48"}', "width must be an integer, found '48'"),
    ):
        (gs2 / "config.json").write_text(text)
        with pytest.raises(FormatError) as e:
            jumprelu.load(str(gs2))
        _one_line(e, "config.json", part)
    for i, (cfg, part) in enumerate(
        (
            ({"d_in": "16"}, "d_in must be an integer, found '16'"),
            ({"d_sae": 0}, "d_sae must be positive, found 0"),
            ({"metadata": {"input_scale": "x"}}, "metadata.input_scale must be a number"),
            ({"metadata": []}, "metadata must be a JSON object"),
        )
    ):
        d = saelens_dir(f"cfg{i}", p)
        (tmp_path / d / "cfg.json").write_text(json.dumps(dict(_saelens_cfg(16, 48), **cfg)))
        with pytest.raises(FormatError) as e:
            jumprelu.load(d)
        _one_line(e, "cfg.json", part)


def test_load_arguments_of_the_wrong_type_and_nan_weights_are_one_line(trained, tmp_path):
    """step=10.0 read as a damaged checkpoint '10.0', member=True as 'sae-True'; a released
    file holding NaN loaded silently where a checkpoint holding it is refused."""
    assert jumprelu.load(str(trained), step=np.int64(20)).step == 20
    for kw, message in (
        ({"step": 20.0}, "step must be an integer, found 20.0"),
        ({"step": "20"}, "step must be an integer, found '20'"),
        ({"member": True}, "member must be an integer, found True"),
    ):
        with pytest.raises(ValueError, match=message):
            jumprelu.load(str(trained), **kw)
    from safetensors.numpy import save_file

    p = {k: v for k, v in _random(np.random.default_rng(0)).items()}
    p["threshold"][3] = np.nan
    np.savez(tmp_path / "p.npz", **p)
    with pytest.raises(gemma_scope.GemmaScopeError, match="p.npz: threshold holds NaN or Inf"):
        jumprelu.load(str(tmp_path / "p.npz"))
    save_file({k.lower(): v for k, v in p.items()}, str(tmp_path / "params.safetensors"))
    with pytest.raises(FormatError, match="params.safetensors: threshold holds NaN or Inf"):
        jumprelu.load(str(tmp_path))


def test_a_store_rewritten_at_the_runs_path_is_refused(tmp_path, tiny_config):
    """evaluate and refit reported on (and fitted to) the new rows as the run's held-out ones;
    a resume would have continued on them."""
    import shutil

    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.errors import ConfigError, DataError
    from jumprelu.store import StoreWriter

    def write(seed):
        w = StoreWriter(str(tmp_path / "acts"), d_model=32)
        w.append(np.random.default_rng(seed).normal(size=(4096, 32)).astype(np.float32))
        w.close()

    write(0)
    tiny_config.data.source, tiny_config.train.steps = str(tmp_path / "acts"), 10
    run = str(tmp_path / "run")
    train(tiny_config, run)
    evaluate_workdir(run)  # the same store: fine
    shutil.rmtree(tmp_path / "acts")
    write(1)
    for command in (lambda: evaluate_workdir(run), lambda: refit_workdir(run, None, 512, 0.01)):
        with pytest.raises(DataError, match=r"acts: holds other rows than the run trained on \(4096 rows, crc32 "):
            command()
    tiny_config.train.steps = 20
    with pytest.raises(ConfigError, match="acts holds other rows .* than the checkpoint .* was trained on"):
        train(tiny_config, run)


def test_store_flag_on_a_run_that_trained_on_no_store_is_refused(trained, tmp_path):
    """Found by an audit: `evaluate --store S` and `refit --store S` on a run trained on synthetic
    data took any store of the right d_model (such a run records no rows to compare with) and
    replaced eval.json and refit/params.npz with results on rows the SAE never saw."""
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.errors import DataError
    from jumprelu.store import StoreWriter

    other = str(tmp_path / "other")
    w = StoreWriter(other, d_model=32)
    w.append(np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32))
    w.close()
    message = f"--store {other}: the run trained on synthetic data, remade from its config .*moved$"
    for command in (
        lambda: evaluate_workdir(str(trained), store=other),
        lambda: refit_workdir(str(trained), None, 512, 0.01, store=other),
    ):
        with pytest.raises(DataError, match=message):
            command()
    assert not (trained / "refit" / "params.npz").exists()
    assert evaluate_workdir(str(trained))[1]["stored"]["fvu"] > 0  # without --store: its own rows


def test_a_named_gemma_scope_2_safetensors_file_is_the_one_read(tmp_path):
    """`jumprelu.load("dir/other.safetensors")` reads that file, not the folder's params.safetensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a, b = ({k.lower(): v for k, v in _random(rng).items()} for _ in range(2))
    save_file(a, str(tmp_path / "params.safetensors"))
    save_file(b, str(tmp_path / "other.safetensors"))
    np.testing.assert_array_equal(np.asarray(jumprelu.load(str(tmp_path / "other.safetensors")).W_enc), b["w_enc"])
    np.testing.assert_array_equal(np.asarray(jumprelu.load(str(tmp_path)).W_enc), a["w_enc"])
    save_file({k: v for k, v in b.items() if k != "b_dec"}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(FormatError, match="broken.safetensors: missing keys"):
        jumprelu.load(str(tmp_path / "broken.safetensors"))


def test_cli_errors_are_one_line(trained, tmp_path):
    cli = subprocess.run(
        [sys.executable, "-m", "jumprelu", "export", str(trained), str(tmp_path / "x"), "--format", "npz"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "invalid choice" in cli.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "jumprelu.export", str(tmp_path / "none"), str(tmp_path / "x"), "--format", "saelens"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "jumprelu: error:" in cli.stderr


def _export_error(workdir, out, *flags):
    cli = _run_export(workdir, out, *flags)
    assert cli.returncode != 0 and cli.stderr.count("\n") == 1, cli.stderr
    return cli.stderr


def test_export_output_mistakes_are_one_line_and_leave_nothing(trained, tmp_path):
    """OUT checked before any work: a directory for the one-file format, a file for a directory
    format; missing parents are made (for every format); a released file cannot give Neuronpedia
    statistics, nor be evaluated or refitted."""
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.export import check_output
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.errors import UserError

    (tmp_path / "dir").mkdir()
    assert "dir: is a directory; --format gemma-scope writes one file" in _export_error(trained, tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and not any((tmp_path / "dir").iterdir())
    (tmp_path / "file").write_text("x")
    assert "file: is a file; --format saelens writes a directory" in _export_error(
        trained, tmp_path / "file", "--format", "saelens"
    )
    (tmp_path / "file.npz").write_text("not an archive")
    np.savez(tmp_path / "acts.npz", acts=np.ones((4, 3)))
    report = (trained / "report.json").read_bytes()  # found by an audit: was replaced by the npz, exit 0
    assert "report.json: --format gemma-scope writes an .npz archive, not a .json file" in _export_error(
        trained, trained / "report.json"
    )
    for victim in (tmp_path / "file", tmp_path / "file.npz", tmp_path / "acts.npz"):
        assert "exists and is not an SAE's .npz (W_enc, W_dec, ...); --format gemma-scope would replace it" in (
            _export_error(trained, victim)
        )
    assert (trained / "report.json").read_bytes() == report and (tmp_path / "file").read_text() == "x"
    config = (trained / "config.json").read_bytes()
    for fmt in ("gemma-scope-2", "saelens", "neuronpedia"):  # gemma-scope-2 replaced the run's config.json
        assert "is a training workdir; --format" in _export_error(trained, trained, "--format", fmt)
    assert (trained / "config.json").read_bytes() == config
    (tmp_path / "sae-0").mkdir()  # a stacked run's member directory
    (tmp_path / "sae-0" / "member.json").write_text('{"member": 0, "workdir": ".."}')
    with pytest.raises(UserError, match="sae-0: is a training workdir"):
        check_output(str(tmp_path / "sae-0"), "saelens")
    (tmp_path / "sae-0" / "member.json").unlink()
    for fmt in ("gemma-scope", "saelens"):  # an audit: "-" (stdout to most tools) was written as a file "-"
        with pytest.raises(UserError, match="OUT '-': export writes files, not to stdout"):
            check_output("-", fmt)
    _export(trained, tmp_path / "new" / "p.npz")
    _export(trained, tmp_path / "new" / "p.npz")  # an earlier export is replaced, whatever its name
    _export(trained, tmp_path / "new" / "params")
    _export(trained, tmp_path / "new" / "params")
    _export(trained, tmp_path / "new2" / "sl", "--format", "saelens")
    assert jumprelu.load(tmp_path / "new2" / "sl").width == jumprelu.load(tmp_path / "new" / "p.npz").width
    released = tmp_path / "new" / "p.npz"
    assert "needs a training workdir" in _export_error(released, tmp_path / "np", "--format", "neuronpedia")
    for top in ("0", "-1"):  # were silently 1
        error = _export_error(trained, tmp_path / "np", "--format", "neuronpedia", "--top", top)
        assert f"--top must be a positive number of activations kept per latent, found {top}" in error
    assert not (tmp_path / "np").exists()
    for command in (lambda: evaluate_workdir(str(released)), lambda: refit_workdir(str(released), None, 64, 0.01)):
        with pytest.raises(UserError, match="p.npz: jumprelu (evaluate|refit) needs a training workdir") as e:
            command()
        assert "\n" not in str(e.value)


def test_export_never_writes_over_or_beside_files_it_did_not_make(trained, tmp_path, monkeypatch):
    """Found by an audit: a directory format wrote into any existing folder (a model's config.json
    replaced, a project's README.md replaced by the model card, and with --hub the whole folder
    uploaded); a name ending in a file suffix made an SAE nothing could load; `newdir/` failed on a
    temporary's name; --hub without huggingface_hub wrote OUT before saying so."""
    from jumprelu.cli import export as export_cli
    from jumprelu.cli.export import check_output
    from jumprelu.errors import UserError

    model = tmp_path / "hf_model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Gemma2ForCausalLM"]}')
    for fmt in ("gemma-scope-2", "saelens", "neuronpedia"):
        error = _export_error(trained, model, "--format", fmt)
        assert f"hf_model: holds config.json, which no earlier export wrote; --format {fmt} writes into it" in error
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert (model / "config.json").read_text() == '{"architectures": ["Gemma2ForCausalLM"]}'
    for fmt in ("gemma-scope-2", "saelens"):  # an earlier export of the format is replaced
        _export(trained, tmp_path / fmt, "--format", fmt)
        (tmp_path / fmt / "params.safetensors.tmp.123").write_text("a killed write's leftover")
        _export(trained, tmp_path / fmt, "--format", fmt)
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my notes")
    with pytest.raises(UserError, match="project: holds README.md, which no earlier export wrote; --hub writes"):
        check_output(str(project), "saelens", hub=True)
    hub.write_repo_dir(jumprelu.load(str(trained)), str(tmp_path / "repo"), "a/b")
    check_output(str(tmp_path / "repo"), "saelens", hub=True)  # an earlier --hub export
    (tmp_path / "repo" / "data.txt").write_text("private")
    with pytest.raises(UserError, match="repo: holds data.txt, which no earlier export wrote"):
        check_output(str(tmp_path / "repo"), "saelens", hub=True)
    names = [
        (tmp_path / "gs2" / "params.safetensors", "gemma-scope-2", "writes a directory, which a .safetensors name"),
        (tmp_path / "sl" / "cfg.json", "saelens", "writes a directory, which a .json name"),
        (tmp_path / "x.safetensors", "gemma-scope", "writes an .npz archive, not a .safetensors file; name it .npz"),
        (f"{tmp_path}/newdir/", "gemma-scope", "newdir/: is a directory; --format gemma-scope writes one file"),
    ]
    for out, fmt, message in names:
        assert message in _export_error(trained, out, "--format", fmt)
    stub = tmp_path / "no_hub"  # an environment without huggingface_hub, whatever this one has
    stub.mkdir()
    (stub / "huggingface_hub.py").write_text("raise ImportError('not installed')")
    cmd = [sys.executable, "-m", "jumprelu", "export", str(trained), str(tmp_path / "card"), "--hub", "a/b"]
    env = {**os.environ, "PYTHONPATH": f"{stub}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and "--hub needs huggingface_hub" in cli.stderr, cli.stderr
    assert not (tmp_path / "card").exists()
    assert not [p for p in tmp_path.iterdir() if p.name in ("gs2", "sl", "x.safetensors", "newdir")]

    def store_gone(*args, **kwargs):
        raise UserError("config field data.source is '/gone/store': no such directory")

    monkeypatch.setattr("jumprelu.cli.evaluate.evaluate_workdir", store_gone)
    monkeypatch.setattr("jumprelu.export.load.recorded_eval", lambda *a: {})
    assert export_cli.held_out_eval(str(trained), jumprelu.load(str(trained)), None) == {}  # l0 left empty


def test_a_checkpoint_deleted_by_the_running_training_is_not_called_damaged(trained, tmp_path, monkeypatch, caplog):
    """Found by an audit: `jumprelu refit` beside a running training failed (3 of 6 tries at
    ckpt.every_steps=10) when the run's rotation deleted the step being read."""
    import shutil

    from jumprelu.export import load as load_module

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    real = load_module._load_step

    def rotated_while_read(ckpt, path, step, member):
        if step == steps[-1]:
            shutil.rmtree(run / "checkpoints" / str(step))
            raise FileNotFoundError(f"Checkpoint at {run}/checkpoints/{step} not found.")
        return real(ckpt, path, step, member)

    monkeypatch.setattr(load_module, "_load_step", rotated_while_read)
    with caplog.at_level("WARNING", logger="jumprelu"):
        sae = jumprelu.load(str(run))
    assert sae.step == steps[-2] and "damaged" not in caplog.text
    # a second audit: a step whose items were deleted while its folder was not yet (its config
    # unreadable) was called damaged, and orbax listing a step deleted as it opened was a raw
    # FileNotFoundError
    shutil.rmtree(run)
    shutil.copytree(trained, run)
    half = run / "checkpoints" / str(steps[-1])

    def half_deleted(ckpt, path, step, member):
        if step == steps[-1] and half.exists():
            for item in half.iterdir():
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            threading.Timer(0.3, shutil.rmtree, (half,)).start()  # the folder goes a moment later
            raise load_module.CheckpointError(f"checkpoint {half} is damaged: its config cannot be read")
        return real(ckpt, path, step, member)

    real_checkpointer, opened = load_module.Checkpointer, []

    def listing_races_a_deletion(*args, **kwargs):
        opened.append(1)
        if len(opened) == 1:
            raise FileNotFoundError(f"No such file or directory: '{run}/checkpoints/{steps[0]}'")
        return real_checkpointer(*args, **kwargs)

    monkeypatch.setattr(load_module, "_load_step", half_deleted)
    monkeypatch.setattr(load_module, "Checkpointer", listing_races_a_deletion)
    caplog.clear()
    with caplog.at_level("WARNING", logger="jumprelu"):
        sae = jumprelu.load(str(run))
    assert sae.step == steps[-2] and "damaged" not in caplog.text and len(opened) == 2


def test_a_damaged_member_file_is_one_line_naming_it(trained, tmp_path):
    from jumprelu.errors import WorkdirError

    member = tmp_path / "sae-1"
    member.mkdir()
    for text, found in (('{"member": 1', "not readable JSON"), ('{"workdir": ".."}', 'found {"workdir": ".."}')):
        (member / "member.json").write_text(text)
        with pytest.raises(WorkdirError, match="sae-1/member.json: ") as e:
            jumprelu.load(str(member))
        assert found in str(e.value) and "\n" not in str(e.value)


def test_a_failed_atomic_write_leaves_no_temporary(tmp_path):
    from jumprelu import fs

    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        fs.write_bytes_atomically(str(tmp_path / "taken"), b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and not any((tmp_path / "taken").iterdir())


def test_a_full_disk_in_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    """Found by an audit: a buffered write's ENOSPC names no file, so `jumprelu train` said only
    "No space left on device" when training_curves.png did not fit."""
    import errno

    from jumprelu import fs

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fs.os, "fsync", full)
    with pytest.raises(OSError) as e:
        fs.write_bytes_atomically(str(tmp_path / "training_curves.png"), b"png")
    assert e.value.filename == str(tmp_path / "training_curves.png") and e.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_gemma_scope_npz_refuses_a_transcoder(tmp_path):
    from safetensors.numpy import save_file

    from jumprelu.export import gemma_scope

    rng = np.random.default_rng(0)
    p = _random(rng, d_out=24)
    arrays = {k.lower(): v for k, v in p.items()}
    arrays["affine_skip_connection"] = rng.normal(size=(16, 24)).astype(np.float32)
    save_file(arrays, str(tmp_path / "params.safetensors"))
    with pytest.raises(gemma_scope.GemmaScopeError, match="transcoder .* export it as gemma-scope-2"):
        gemma_scope.export(jumprelu.load(str(tmp_path / "params.safetensors")), str(tmp_path / "tc.npz"))
    assert not (tmp_path / "tc.npz").exists()


def test_topk_exports_to_saelens_as_topk(tmp_path, tiny_config):
    tiny_config.sae.update(kind="topk", k=4)
    tiny_config.train.steps = 4
    train(tiny_config, str(tmp_path / "run"))
    ours = jumprelu.load(str(tmp_path / "run"))
    cfg = saelens.export(ours, str(tmp_path / "sl"))
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    theirs = jumprelu.load(str(tmp_path / "sl"))
    assert theirs.k == 4
    x = np.random.default_rng(1).normal(size=(64, ours.d_model)).astype(np.float32) * ours.scale
    _same_computation(ours, theirs, x)
    with pytest.raises(FormatError, match="TopK"):
        gemma_scope_2.export(ours, str(tmp_path / "gs2"))


def test_site_names_map_to_released_hook_names():
    assert hooks.saelens_hook("resid", 12) == "blocks.12.hook_resid_post"
    assert hooks.saelens_hook("mlp", 3) == "blocks.3.hook_mlp_out"
    assert hooks.saelens_hook("attn", 0) == "blocks.0.attn.hook_z"
    assert hooks.saelens_hook("resid_post", 20) == "blocks.20.hook_resid_post"
    assert hooks.hf_hook_point("resid", 12) == "model.layers.12.output"
    assert hooks.hf_hook_point("mlp", 5) == "model.layers.5.post_feedforward_layernorm.output"
    assert hooks.hf_hook_point("attn", 7) == "model.layers.7.self_attn.o_proj.input"
    assert hooks.saelens_hook("synthetic", None) is None and hooks.saelens_hook("logits", 3) is None
    for site in ("resid", "mlp", "attn"):
        assert hooks.site_of_hook(hooks.saelens_hook(site, 9)) == (site, 9)
        assert hooks.site_of_hook(hooks.hf_hook_point(site, 9)) == (site, 9)


def test_harvested_store_provenance_reaches_the_saelens_cfg(tmp_path):
    from jumprelu.store import StoreWriter

    w = StoreWriter(
        str(tmp_path / "store"), d_model=8, model="gemma2_2b", site="attn", layer=6, extra={"seq_len": 1024}
    )
    w.append(np.ones((4, 8), np.float32))
    w.close()
    p = hooks.provenance({"data": {"source": str(tmp_path / "store")}})
    assert p["model_name"] == "gemma-2-2b" and p["hf_model"] == "google/gemma-2-2b"
    assert p["hook_name"] == "blocks.6.attn.hook_z" and p["context_size"] == 1024
    sae = jumprelu.SAE(**{k: np.asarray(v) for k, v in _random(np.random.default_rng(0), d=8, m=4).items()})
    cfg = saelens.config(sae, p)
    assert cfg["reshape_activations"] == "hook_z" and cfg["metadata"]["hook_name"] == "blocks.6.attn.hook_z"
    assert gemma_scope_2.config(sae, p)["hf_hook_point_in"] == "model.layers.6.self_attn.o_proj.input"


def test_a_run_on_a_relative_store_keeps_its_provenance_from_anywhere(tmp_path, tiny_config, monkeypatch):
    """data.source as typed (relative) no longer resolves from another directory: the run recorded
    the store's absolute path and its model, site and layer, so exports still name the hook and
    evaluate and refit still find the rows; the refit's params.npz carries them too."""
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.store import StoreWriter

    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    w = StoreWriter(str(tmp_path / "project" / "acts"), d_model=32, model="gemma2_2b", site="resid", layer=12)
    w.append(np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32))
    w.close()
    monkeypatch.chdir(tmp_path / "project")
    tiny_config.data.source = "acts"
    tiny_config.train.steps = 10
    report = train(tiny_config, "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for key in ("curves", "checkpoint", "workdir"):  # report.json's paths work from any directory
        assert os.path.isabs(report[key]) and os.path.exists(report[key]), (key, report[key])
    # a store of the same relative name here is another one: the run's recorded path wins
    w = StoreWriter("acts", d_model=32, model="gemma2_9b", site="mlp", layer=20)
    w.append(np.ones((8, 32), np.float32))
    w.close()
    run = str(tmp_path / "project" / "run")
    sae = jumprelu.load(run)
    assert sae.config["data"]["source"] == "acts"
    assert sae.config["trained_on"]["path"] == str(tmp_path / "project" / "acts")
    assert saelens.export(sae, "sl")["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
    _, evaluated, _ = evaluate_workdir(run)
    assert evaluated["stored"]["tokens"] == 512
    from jumprelu.errors import WorkdirError
    from jumprelu.train import lock

    with lock.hold(os.path.join(run, "refit")):  # another refit of this run under way: this one stops at once
        busy = r"refit is in use by another run: pid \d+ .*; wait for that refit to finish$"
        with pytest.raises(WorkdirError, match=busy):
            refit_workdir(run, None, 512, 0.01)
    params = refit_workdir(run, None, 512, 0.01)["params"]
    refit = jumprelu.load(params)
    assert (refit.step, refit.scale) == (sae.step, sae.scale)
    assert saelens.export(refit, "sl_refit")["metadata"]["model_name"] == "gemma-2-2b"


def test_evaluate_lm_is_checked_against_the_stores_model_site_and_layer():
    from ml_collections import ConfigDict

    from jumprelu.cli.evaluate import check_lm_site
    from jumprelu.errors import UserError
    from jumprelu.launch import experiment

    def trained(model, site, layer):
        return {"data": {"source": "/nowhere"}, "trained_on": {"model": model, "site": site, "layer": layer}}

    def lm(arg, harvest="harvest/gemma2"):
        c = ConfigDict(experiment.load(harvest).get_config(arg).to_dict())
        c.eval.texts = ("heldout.jsonl",)
        return c

    many = lm("model=gemma2_9b,sites=resid+mlp+attn,layers=9+20+31")  # the store's multi-site harvest config
    check_lm_site(trained("gemma2_9b", "mlp", 9), many)
    assert (many.site, many.layer, many.sites, many.layers) == ("mlp", 9, (), ())  # spliced at the SAE's site
    check_lm_site(trained("gemma-2-2b", "resid", 12), lm("model=gemma2_2b,layer=12"))  # a converted store's name
    check_lm_site(trained("gemma3_1b_pt", "resid", 13), lm("model=gemma3_1b_it,layer=13", "harvest/gemma3"))
    for config, arg, message in [
        (trained("gemma2_9b", "resid", 20), "model=gemma2_2b,layer=20", "--lm model is 'gemma2_2b' but"),
        (trained("gemma2_9b", "resid", 20), "model=gemma2_9b,layer=9", "--lm site, layer are resid 9 but"),
        (trained("gemma2_9b", "mlp", 31), "model=gemma2_9b,sites=resid+mlp,layers=9+20", "site, layer are resid 9,"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            check_lm_site(config, lm(arg))
        assert "\n" not in str(e.value) and "trained on rows of model gemma2_9b" in str(e.value)
    # found by an audit: a training config was an AttributeError traceback, and an empty eval.texts
    # was one line, both after the stored rows' evaluation and the LM's import
    with pytest.raises(UserError, match=r"^--lm: not a harvest config \(it has no 'model' field\)"):
        check_lm_site(trained("gemma2_9b", "resid", 20), experiment.load("quickstart").get_config(None))
    no_texts = lm("model=gemma2_9b,layer=20")
    no_texts.eval.texts = ()
    with pytest.raises(UserError, match=r"^config field eval.texts is empty"):
        check_lm_site(trained("gemma2_9b", "resid", 20), no_texts)


def test_hub_directory_is_a_saelens_release_with_a_model_card(trained, tmp_path):
    """--hub pushes this directory; without network we test what would be pushed."""
    sae = jumprelu.load(str(trained))
    report = json.loads((trained / "report.json").read_text())
    sid = hub.write_repo_dir(sae, str(tmp_path / "repo"), "someone/my-sae", report)
    assert sid == "sae"  # synthetic data: no hook name
    card = (tmp_path / "repo" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    assert 'SAE.from_pretrained(release="someone/my-sae", sae_id="sae")' in card
    assert f"{report['eval']['l0']:.4g}" in card
    theirs = jumprelu.load(str(tmp_path / "repo" / sid))
    _same_computation(sae, theirs, np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32))
    flags = ["--hub", "a/b", "--format", "gemma-scope"]
    cli = subprocess.run(
        [sys.executable, "-m", "jumprelu", "export", str(trained), str(tmp_path / "x"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "--hub pushes a SAELens directory" in cli.stderr


def test_neuronpedia_statistics(trained, tmp_path):
    _export(trained, tmp_path / "np", "--format", "neuronpedia", "--top", "5")
    header = json.loads((tmp_path / "np" / "feature_stats.json").read_text())
    features = [json.loads(line) for line in (tmp_path / "np" / "features.jsonl").read_text().splitlines()]
    assert header["width"] == len(features) == 64 and header["eval_rows"] == 512 and header["has_contexts"] is False
    report = json.loads((trained / "report.json").read_text())
    freq = np.array([f["firing_frequency"] for f in features])
    np.testing.assert_allclose(freq.sum(), report["eval"]["l0"], rtol=1e-6)  # mean L0 = sum of frequencies
    assert header["dead_latents"] == int((freq == 0).sum()) == round(report["eval"]["dead_fraction"] * 64)
    assert sum(header["log10_frequency_histogram"]["counts"]) == 64
    # The top rows are the largest activations of each latent on the held-out rows, in order.
    sae = jumprelu.load(str(trained))
    rows, coords, _ = neuronpedia.eval_rows(str(trained), sae.config)
    f = np.asarray(sae.encode(rows))
    for feat in features:
        i, top = feat["index"], feat["top"]
        assert len(top) == min(5, int((f[:, i] > 0).sum()))
        if top:
            np.testing.assert_allclose([t["activation"] for t in top], np.sort(f[:, i])[::-1][: len(top)], rtol=1e-5)
            assert [t["store_row"] for t in top] == [int(coords[t["row"], 1]) for t in top]
            assert feat["max_activation"] == top[0]["activation"]


def test_readme_test_command_is_what_ci_runs():
    """README "Two commands for a fresh machine": the second is .ci/run's command, verbatim
    (it makes the SAELens peer environment the real-SAELens test runs in)."""
    with open(f"{ROOT}/README.md") as f:
        section = f.read().split("## Two commands for a fresh machine")[1].split("\n## ")[0]
    commands = [block.strip() for block in section.split("```bash")[1:]]
    with open(f"{ROOT}/.ci/run") as f:
        ci = f.read().strip().splitlines()[-1]
    assert commands[1].split("```")[0].strip() == ci
    assert "bash benchmarks/peers/setup.sh" in ci


def test_an_older_saelens_topk_release_loads_as_topk(tmp_path):
    """SAELens before 6.0 wrote TopK SAEs as architecture "standard" with activation_fn "topk": read
    as a ReLU SAE they encoded L0 30 for k 5, silently. Its other legacy spellings load too."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = _random(rng)
    p.pop("threshold")
    save_file(p, str(tmp_path / "sae_weights.safetensors"))
    legacy = {"d_in": 16, "d_sae": 48, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
              "apply_b_dec_to_input": True, "normalize_activations": False, "hook_point": "blocks.3.hook_resid_post",
              "model_name": "gpt2", "sae_lens_training_version": "4.4.1"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(legacy))
    sae = jumprelu.load(str(tmp_path))
    assert sae.k == 5
    x = rng.normal(size=(32, 16)).astype(np.float32)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    kth = np.sort(h, axis=1)[:, -5:-4]
    np.testing.assert_allclose(np.asarray(sae.encode(x)), np.where((h >= kth) & (h > 0), h, 0), rtol=1e-4, atol=1e-4)
    # no architecture at all: a ReLU SAE, as SAELens reads it
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": 48, "apply_b_dec_to_input": False}))
    relu = jumprelu.load(str(tmp_path))
    assert relu.k is None and float(np.abs(relu.threshold).max()) == 0
    # SAELens 5 wrote TopK as architecture "topk" with k only in activation_fn_kwargs
    (tmp_path / "cfg.json").write_text(json.dumps(dict(legacy, architecture="topk")))
    assert jumprelu.load(str(tmp_path)).k == 5
    # an activation function we cannot fold is refused, not read as ReLU
    (tmp_path / "cfg.json").write_text(json.dumps(dict(legacy, activation_fn_str="tanh-relu")))
    with pytest.raises(FormatError, match=r"cfg.json: activation_fn 'tanh-relu' \(with architecture 'standard'\)"):
        jumprelu.load(str(tmp_path))


def test_released_saes_keep_their_provenance_across_formats_and_transcoders_stay_out_of_saelens(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = _random(rng)
    save_file({k.lower(): v for k, v in p.items()}, str(tmp_path / "params.safetensors"))
    released = {"hf_hook_point_in": "model.layers.3.output", "hf_hook_point_out": "model.layers.3.output",
                "width": 48, "model_name": "google/gemma-2-2b", "architecture": "jump_relu", "l0": 12,
                "affine_connection": False, "type": "sae"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(released))
    sae = jumprelu.load(str(tmp_path))
    assert gemma_scope_2.config(sae) == released  # re-exported as it was, l0 included
    cfg = saelens.config(sae)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["model_name"] == "gemma-2-2b"
    saelens.export(sae, str(tmp_path / "sl"))
    back = gemma_scope_2.config(jumprelu.load(str(tmp_path / "sl")))
    assert back["hf_hook_point_in"] == "model.layers.3.output" and back["model_name"] == "google/gemma-2-2b"
    assert back["l0"] is None  # SAELens records none: unknown, not 0
    # two loads are one pytree structure (config compared by value): they stack and map together
    import jax

    stacked = jax.tree_util.tree_map(lambda a, b: np.stack([a, b]), sae, jumprelu.load(str(tmp_path)))
    assert stacked.W_enc.shape == (2, 16, 48)
    # a transcoder's release keeps its own output hook
    tc_cfg = dict(released, hf_hook_point_out="model.layers.3.post_feedforward_layernorm.output")
    (tmp_path / "config.json").write_text(json.dumps(tc_cfg))
    assert gemma_scope_2.config(jumprelu.load(str(tmp_path)))["hf_hook_point_out"] == tc_cfg["hf_hook_point_out"]
    # a store named in TransformerLens's spelling still gets the Hugging Face id
    assert hooks.model_names("gemma-2-2b") == ("gemma-2-2b", "google/gemma-2-2b")
    # an SAE whose decoder writes another width (a transcoder without skip) has no SAELens form
    tc = tmp_path / "tc"
    tc.mkdir()
    save_file({k.lower(): v for k, v in _random(rng, d_out=24).items()}, str(tc / "params.safetensors"))
    with pytest.raises(FormatError, match="output width 24 against input 16"):
        saelens.export(jumprelu.load(str(tc)), str(tmp_path / "tc_sl"))
    assert not (tmp_path / "tc_sl").exists()
    # a transcoder without skip whose output width is its input's stays one (was re-exported as
    # type "sae", and SAELens and npz exports wrote it as an SAE)
    (tmp_path / "config.json").write_text(json.dumps(dict(released, type="transcoder")))
    tc = jumprelu.load(str(tmp_path))
    assert gemma_scope_2.config(tc)["type"] == "transcoder"
    with pytest.raises(FormatError, match="a transcoder \\(its release's type is 'transcoder'\\) has no SAELens"):
        saelens.export(tc, str(tmp_path / "tc_sl"))
    with pytest.raises(gemma_scope.GemmaScopeError, match="a transcoder \\(its release's type"):
        gemma_scope.export(tc, str(tmp_path / "tc.npz"))
    (tmp_path / "config.json").write_text(json.dumps(tc_cfg))  # written as an SAE, but reads one site, writes another
    assert gemma_scope_2.config(jumprelu.load(str(tmp_path)))["type"] == "transcoder"
    assert not (tmp_path / "tc_sl").exists() and not (tmp_path / "tc.npz").exists()
    # a hook name that is not a string is refused when read (was an AttributeError at export)
    for bad in ({"hf_hook_point_in": 3}, {"model_name": ["gemma"]}):
        (tmp_path / "config.json").write_text(json.dumps(dict(released, **bad)))
        with pytest.raises(FormatError, match=f"config.json: {next(iter(bad))} must be a string, found"):
            jumprelu.load(str(tmp_path))
    saelens.export(sae, str(tmp_path / "sl2"))
    cfg = json.loads((tmp_path / "sl2" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = 12
    (tmp_path / "sl2" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="cfg.json: metadata.hook_name must be a string, found 12"):
        jumprelu.load(str(tmp_path / "sl2"))


def test_a_gemma_scope_npz_threshold_below_zero_fires_as_gemma_scope_computes(tmp_path):
    """Gemma Scope's reference encoder is mask · ReLU(h): a negative θ (a foreign file; ours are
    clipped positive in training) must not let negative pre-activations through."""
    rng = np.random.default_rng(0)
    p = _random(rng)
    p["threshold"][:8] = -0.5
    np.savez(tmp_path / "neg.npz", **p)
    sae = jumprelu.load(str(tmp_path / "neg.npz"))
    x = rng.normal(size=(32, 16)).astype(np.float32) * 3
    h = x @ p["W_enc"] + p["b_enc"]
    np.testing.assert_allclose(np.asarray(sae.encode(x)), np.maximum(h, 0) * (h > p["threshold"]), atol=1e-4)


def test_a_loaded_sae_goes_through_jit_and_vmap_as_a_function_and_as_an_argument(trained):
    """jax.jit(sae) raised "unhashable type: ArrayImpl" (the dataclass hashed its arrays), and an SAE
    could not be an argument of a jitted function (it was no pytree)."""
    import jax

    sae = jumprelu.load(str(trained))
    x = np.random.default_rng(0).normal(size=(8, sae.d_model)).astype(np.float32) * sae.scale
    want = np.asarray(sae(x))
    np.testing.assert_allclose(np.asarray(jax.jit(sae)(x)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda s, x: s(x))(sae, x)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(sae.encode)(x)), np.asarray(sae.encode(x)), rtol=1e-6, atol=1e-6)
    again = jax.tree_util.tree_map(lambda a: a, sae)
    assert (again.step, again.scale, again.config) == (sae.step, sae.scale, sae.config) and again.k == sae.k


def test_neuronpedia_statistics_leave_out_the_rows_the_controller_read(tmp_path, tiny_config):
    """As report.json and evaluate do: the held-out rows the target-L0 controller read in training
    are not held out from it, so the export's frequencies and dead count must not count them."""
    tiny_config.sae.update(target_l0=5.0, target_l0_held_out_rows=128)
    tiny_config.train.sparsity_warmup_steps = 0
    run = tmp_path / "run"
    train(tiny_config, str(run))
    _export(run, tmp_path / "np", "--format", "neuronpedia", "--top", "3")
    header = json.loads((tmp_path / "np" / "feature_stats.json").read_text())
    assert header["eval_rows"] == 512 - 128
    freq = [
        json.loads(line)["firing_frequency"] for line in (tmp_path / "np" / "features.jsonl").read_text().splitlines()
    ]
    report = json.loads((run / "report.json").read_text())
    np.testing.assert_allclose(sum(freq), report["eval"]["l0"], rtol=1e-6)
    # a run whose controller read every held-out row has none left (was: statistics calling all dead)
    from jumprelu.errors import UserError

    config = json.loads((run / "config.json").read_text())
    config["sae"]["target_l0_held_out_rows"] = 512
    with pytest.raises(UserError, match="no held-out rows for feature statistics: data.eval_rows=512 and the"):
        neuronpedia.eval_rows(str(run), config)


def test_commands_drop_orbaxs_abandoned_save_reports(caplog):
    """An audit: after the one-line error for a full disk, asyncio's "Future exception was never
    retrieved" dumps and "coroutine ... was never awaited" warnings of orbax's abandoned saves
    followed it. Commands (without --verbosity) drop them; other warnings stay."""
    import logging
    import warnings
    from types import SimpleNamespace

    from jumprelu.cli import common

    level = logging.getLogger("asyncio").level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            common.quiet_libraries({"verbosity": SimpleNamespace(present=False)})

            async def save():
                return None

            save()  # never awaited: the RuntimeWarning at its collection
            import gc

            gc.collect()
            logging.getLogger("asyncio").error("Future exception was never retrieved")
            warnings.warn("kept", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["kept"]
        assert "never retrieved" not in caplog.text
    finally:
        logging.getLogger("asyncio").setLevel(level)


def test_a_killed_reexport_never_pairs_one_saes_weights_with_anothers_metadata(trained, tmp_path, monkeypatch):
    """Found by an audit: each file of a directory export was atomic but the pair was not, so a kill
    between the weights and the metadata left the new weights beside the earlier SAE's cfg.json
    (hook, model, steps, scale), which loaded silently, in SAELens too. The half-written folder it now
    leaves is refused naming the missing file (it was called 'no checkpoints/ directory')."""
    from jumprelu import fs
    from jumprelu.export import gemma_scope_2, saelens

    sae = jumprelu.load(str(trained))
    metadata = {"saelens": "cfg.json", "gemma-scope-2": "config.json", "neuronpedia": "feature_stats.json"}
    for fmt in metadata:
        _export(trained, tmp_path / fmt, "--format", fmt)
    real_write = fs.write_text_atomically

    def killed(path, text):
        if path.endswith(tuple(metadata.values())):
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(fs, "write_text_atomically", killed)
    for export in (saelens.export, gemma_scope_2.export):
        fmt = "saelens" if export is saelens.export else "gemma-scope-2"
        with pytest.raises(KeyboardInterrupt):
            export(sae, str(tmp_path / fmt))
        assert not (tmp_path / fmt / metadata[fmt]).exists()
    rows = np.zeros((4, sae.d_model), np.float32)
    with pytest.raises(KeyboardInterrupt):
        neuronpedia.export(sae, str(tmp_path / "neuronpedia"), rows, np.zeros((4, 2), np.int64), None, top=2)
    assert not (tmp_path / "neuronpedia" / "feature_stats.json").exists()
    monkeypatch.undo()
    error = _export_error(tmp_path / "saelens", tmp_path / "again", "--format", "saelens")
    assert error.strip() == f"jumprelu: error: {tmp_path / 'saelens' / 'cfg.json'}: no such file", error
    (tmp_path / "saelens" / "sae_weights.safetensors").unlink()
    _export(trained, tmp_path / "w", "--format", "saelens")
    (tmp_path / "w" / "sae_weights.safetensors").rename(tmp_path / "saelens" / "cfg.json")  # cfg only, any content
    (tmp_path / "saelens" / "cfg.json").write_text((tmp_path / "w" / "cfg.json").read_text())
    error = _export_error(tmp_path / "saelens", tmp_path / "again", "--format", "saelens")
    assert error.strip().endswith("sae_weights.safetensors: no such file"), error


def test_export_reads_a_moved_store_given_by_flag_and_names_a_checkpoints_unknown_kind(tmp_path, tiny_config):
    """Found by an audit: a run whose store had moved could not be exported for Neuronpedia (no
    --store, as evaluate and refit have), and the Gemma Scope 2 export's advice named `jumprelu
    evaluate --store`. A checkpoint of a kind this version lacks did not say which checkpoint."""
    import shutil

    from jumprelu.store import StoreWriter

    w = StoreWriter(str(tmp_path / "acts"), d_model=32)
    w.append(np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32))
    w.close()
    tiny_config.data.source, tiny_config.train.steps = str(tmp_path / "acts"), 20
    run = tmp_path / "run"
    train(tiny_config, str(run))
    shutil.move(tmp_path / "acts", tmp_path / "moved")
    error = _export_error(run, tmp_path / "np", "--format", "neuronpedia")
    assert error.strip().endswith("give its new path: jumprelu export --format neuronpedia --store PATH"), error
    _export(run, tmp_path / "np", "--format", "neuronpedia", "--store", str(tmp_path / "moved"))
    header = json.loads((tmp_path / "np" / "feature_stats.json").read_text())
    assert header["eval_rows"] == 512
    (run / "report.json").unlink()  # so that the Gemma Scope 2 export measures its l0 on the store
    cli = _export(run, tmp_path / "gs2", "--format", "gemma-scope-2", "--store", str(tmp_path / "moved"))
    assert json.loads((tmp_path / "gs2" / "config.json").read_text())["l0"] > 0, cli.stdout
    cli = _export(run, tmp_path / "gs2b", "--format", "gemma-scope-2")
    assert "jumprelu export --store PATH" in cli.stdout and "jumprelu evaluate" not in cli.stdout, cli.stdout
    for fmt in ("gemma-scope", "saelens"):  # an audit: --store was ignored silently by the weights-only formats
        error = _export_error(run, tmp_path / "w", "--format", fmt, "--store", str(tmp_path / "moved"))
        assert f"--store is read by --format gemma-scope-2 and neuronpedia, and by --hub; --format {fmt}" in error
    metadata = run / "checkpoints" / "20" / "config" / "metadata"
    metadata.write_text(metadata.read_text().replace('"kind": "jumprelu"', '"kind": "abstopk"'))
    error = _export_error(run, tmp_path / "x.npz")
    assert error.startswith(f"jumprelu: error: checkpoint {run / 'checkpoints'}/20: config field sae.kind"), error


def test_a_process_without_a_cpu_backend_still_loads(trained, monkeypatch):
    """Found by an audit: `jumprelu.load` placed the SAE with jax.devices("cpu"), which raises in a
    process started with JAX_PLATFORMS=cuda (or tpu), as the README's GPU test command is."""
    real = jax.devices

    def no_cpu_backend(backend=None):
        if backend == "cpu":
            raise RuntimeError(
                "Unknown backend: 'cpu' requested, but no platforms that are instances of cpu are present"
            )
        return real(backend)

    expected = jumprelu.load(str(trained))
    monkeypatch.setattr(jax, "devices", no_cpu_backend)
    sae = jumprelu.load(str(trained))
    np.testing.assert_array_equal(np.asarray(sae.W_enc), np.asarray(expected.W_enc))


_UNWRITABLE = """
import builtins, errno, os, sys
run, how = sys.argv[1], sys.argv[2]
real_open, real_os_open = builtins.open, os.open
def refuse(path):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
def os_open(path, flags, *a, **k):  # as a folder of another user's is to us: readable, not writable
    if str(path).startswith(run) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse(path)
    return real_os_open(path, flags, *a, **k)
def open_(file, mode="r", *a, **k):
    if str(file).startswith(run) and any(c in mode for c in "wax+"):
        refuse(file)
    return real_open(file, mode, *a, **k)
def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
if how == "forbidden":
    os.open, builtins.open = os_open, open_
elif how == "unreadable":  # eval.json holds an earlier delta LM loss, and reading it fails
    from jumprelu import fs
    real_read = fs.read_text
    def read_text(path):
        if path.endswith("eval.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_read(path)
    fs.read_text = read_text
else:  # the disk fills while it evaluates: the first write of the report fails
    os.fsync = full
from jumprelu.cli import main
sys.exit(main(["evaluate", "--workdir", run]))
"""


def test_evaluate_says_it_cannot_write_its_report_before_evaluating_and_a_late_failure_keeps_the_metrics(
    trained, tmp_path
):
    """Found by an audit: `jumprelu evaluate` on a run folder it could not write ran the whole
    evaluation (with --lm, hours) and then died in a PermissionError traceback writing
    firing_frequency.png; the metrics, printed only after the files, were lost."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = sorted(p.name for p in run.iterdir())
    cli = subprocess.run(
        [sys.executable, "-c", _UNWRITABLE, str(run), "forbidden"], cwd=ROOT, capture_output=True, text=True
    )
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == f"jumprelu: error: {run}: Permission denied", cli.stderr
    assert "Traceback" not in cli.stderr and '"fvu"' not in cli.stdout  # said before the evaluation ran
    assert sorted(p.name for p in run.iterdir()) == before
    cli = subprocess.run(
        [sys.executable, "-c", _UNWRITABLE, str(run), "full"], cwd=ROOT, capture_output=True, text=True
    )
    assert cli.returncode == 2, cli.stderr
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jumprelu: error: {run / 'firing_frequency.png'}: No space left on device; free some")
    assert json.loads(cli.stdout[cli.stdout.index("{") :])["stored"]["fvu"] > 0  # printed whole before the write
    assert sorted(p.name for p in run.iterdir()) == before  # no temporary left behind
    # found by the review of this change: an eval.json it could not read (holding a delta LM loss that
    # took hours) was replaced by one without it; now it is left as it was, after the metrics
    kept = json.dumps({"step": 40, "lm": {"delta_lm_loss": 0.1}})
    (run / "eval.json").write_text(kept)
    cli = subprocess.run(
        [sys.executable, "-c", _UNWRITABLE, str(run), "unreadable"], cwd=ROOT, capture_output=True, text=True
    )
    assert cli.returncode != 0 and '"fvu"' in cli.stdout and (run / "eval.json").read_text() == kept, cli.stderr
    # and a file given as the workdir is named as one, not a NotADirectoryError from the write check
    export = subprocess.run(
        [sys.executable, "-m", "jumprelu", "export", str(run), str(tmp_path / "p.npz")], cwd=ROOT, capture_output=True
    )
    assert export.returncode == 0
    cli = subprocess.run(
        [sys.executable, "-m", "jumprelu", "evaluate", "--workdir", str(tmp_path / "p.npz")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "needs a training workdir" in cli.stderr, cli.stderr


def test_a_workdir_that_is_not_there_is_called_so(tmp_path):
    """Found by an audit: `evaluate --workdir /nonexistent` said "no checkpoints/ directory", as if
    the folder were there; a check that the run folder is writable must not say "[Errno 2]" first."""
    gone = tmp_path / "gone"
    for cmd in (
        ["evaluate", "--workdir", str(gone)],
        ["refit", "--workdir", str(gone)],
        ["export", str(gone), "x.npz"],
    ):
        cli = subprocess.run([sys.executable, "-m", "jumprelu", *cmd], cwd=tmp_path, capture_output=True, text=True)
        want = f"jumprelu: error: {gone}: no such directory; expected a jumprelu training workdir"
        assert cli.returncode == 2 and cli.stderr.strip().splitlines()[-1] == want, (cmd, cli.stderr)


def test_evaluate_lm_names_a_missing_checkpoint_before_evaluating(trained, tmp_path):
    """A missing LM checkpoint was found after the stored rows' evaluation and gemma's import (its
    TensorFlow start-up lines before the error)."""
    (tmp_path / "heldout.txt").write_text("Some held-out text.\n")
    cmd = [sys.executable, "-m", "jumprelu", "evaluate", "--workdir", str(trained), "--lm", "harvest/gemma2:layer=1"]
    cmd += [f"--lm.checkpoint={tmp_path / 'nope'}", f"--lm.tokenizer={tmp_path / 'tok.model'}"]
    cmd += [f"--lm.eval.texts=('{tmp_path / 'heldout.txt'}',)"]
    cli = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert (
        cli.returncode == 2
        and cli.stderr
        == f"jumprelu: error: checkpoint {tmp_path / 'nope'}: no such directory (expected a Gemma orbax checkpoint)\n"
    ), cli.stderr
    assert '"fvu"' not in cli.stdout


def test_a_damaged_report_is_measured_again_not_a_nameless_json_error(trained, tmp_path):
    """Found by an audit: `export RUN out --format gemma-scope-2` with a report.json cut short said
    only "jumprelu: error: Unterminated string starting at: line 4 column 3 (char 38)"."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for text in ('{"steps": 40, "eval": {"l0', "[]", '{"steps": 40, "eval": []}'):
        (run / "report.json").write_text(text)
        cli = _export(run, tmp_path / f"gs2-{len(text)}", "--format", "gemma-scope-2")
        assert json.loads((tmp_path / f"gs2-{len(text)}" / "config.json").read_text())["l0"] > 0, cli.stdout
        if text != '{"steps": 40, "eval": []}':  # (a report whose eval is not an object: none recorded)
            assert f"{run / 'report.json'} is not readable" in cli.stderr, cli.stderr


def test_a_loaded_sae_follows_its_inputs_device_and_names_a_wrong_shape(trained):
    """Found by an audit: `jumprelu.load(workdir)` committed the SAE to cpu:0, so `sae(x)` of an x on
    another device (a GPU, a sharded batch) was a device-mismatch error where the same SAE loaded
    from its params.npz worked; and a wrong d_model was dot_general's "contracting dimensions"."""
    sae = jumprelu.load(str(trained))
    assert not sae.W_enc.committed
    x = jax.device_put(np.ones((3, sae.d_model), np.float32), jax.devices()[1])
    y = sae(x)
    assert y.devices() == {jax.devices()[1]} and y.shape == (3, sae.d_model)
    np.testing.assert_allclose(np.asarray(y), np.asarray(sae(np.ones((3, sae.d_model), np.float32))), rtol=1e-6)
    for method, shape, message in (
        ("encode", (4, sae.d_model + 1), rf"SAE.encode: x has shape \[4, {sae.d_model + 1}\]; expected \[..., "),
        ("decode", (4, sae.d_model), rf"SAE.decode: f has shape \[4, {sae.d_model}\]; expected \[..., {sae.width}\]"),
        ("__call__", (sae.d_model, 2), r"SAE.encode: x has shape .*\(the SAE's d_model\)"),
    ):
        with pytest.raises(ValueError, match=message):
            getattr(sae, method)(np.ones(shape, np.float32))
        with pytest.raises(ValueError, match=message):  # the same under jit
            jax.jit(lambda s, a, m=method: getattr(s, m)(a))(sae, np.ones(shape, np.float32))


def test_a_topk_sae_keeps_its_k_through_params_and_loads_onto_the_cpu(tmp_path):
    """An audit of the API a researcher uses: a workdir's TopK `k` was a jax array (unhashable, not
    JSON, refused as a static argument) where the SAELens file gave an int; `SAE(**sae.params())`
    and `np.savez(f, **sae.params())` dropped k, so the copy kept every positive latent; released
    files loaded onto JAX's default device rather than the CPU a workdir's SAE is read onto;
    `decode` refused a list, which encode takes."""
    from tests.conftest import make_tiny_config

    cfg = make_tiny_config()
    cfg.sae.update(kind="topk", k=4)
    cfg.train.steps = 20
    train(cfg, str(tmp_path / "run"))
    sae = jumprelu.load(str(tmp_path / "run"))
    assert type(sae.k) is int and sae.k == 4 and json.dumps({"k": sae.k}) == '{"k": 4}'
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    copy = jumprelu.SAE(**sae.params())
    assert copy.k == 4 and (np.asarray(copy.encode(x)) != 0).sum(-1).max() <= 4
    _same_computation(sae, copy, x)
    np.savez(tmp_path / "mine.npz", **sae.params())
    _same_computation(sae, jumprelu.load(str(tmp_path / "mine.npz")), x)
    np.testing.assert_array_equal(np.asarray(sae.decode(np.asarray(sae.encode(x)).tolist())), np.asarray(sae(x)))
    _export(tmp_path / "run", tmp_path / "sl", "--format", "saelens")
    cpu0 = jax.devices("cpu")[0]
    with jax.default_device(jax.devices()[1]):  # as a GPU would be the default device
        for path in (tmp_path / "run", tmp_path / "mine.npz", tmp_path / "sl"):
            assert jumprelu.load(str(path)).W_enc.devices() == {cpu0}, path
