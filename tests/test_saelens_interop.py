"""Our SAELens export, loaded by the real sae_lens package: its encode/decode equal ours.

SAELens (and torch) are never dependencies of jumprelu: they live in the peer virtualenv that
`bash benchmarks/peers/setup.sh` makes (.ci/run runs it first), and these tests drive that
interpreter in one subprocess for all their SAEs. For each SAE it runs the README's "Using your
SAE elsewhere" SAELens snippet verbatim (only the directory replaced), then encodes inputs of
ours with the same SAE.
Set JUMPRELU_SAELENS_PYTHON to use another interpreter that has sae_lens.
"""

import json
import os
import re
import subprocess

import numpy as np
import pytest

import jumprelu
from jumprelu.export import saelens
from jumprelu.train.loop import train
from tests.conftest import make_tiny_config
from tests.test_train import ROOT

PEER = os.environ.get("JUMPRELU_SAELENS_PYTHON") or os.path.join(ROOT, "benchmarks", "peers", ".venv", "bin", "python")
README_DIR = "/tmp/jumprelu_quickstart_saelens"  # the directory the README's snippet names

pytestmark = pytest.mark.skipif(
    not os.path.exists(PEER),
    reason=f"sae-lens peer environment not installed ({PEER}): run `bash benchmarks/peers/setup.sh`",
)


def readme_snippet() -> str:
    """The README's SAELens loading snippet (the python block after the marker comment)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- saelens-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its <!-- saelens-snippet --> block"
    return m.group(1)


KINDS = ("jumprelu", "batchtopk", "topk")

# Run once per exported SAE, after the README's snippet (which made `torch`, `sae`, `x`, `f` and
# `x_hat`): SAELens's encode/decode of inputs of ours, saved for the test to compare.
CHECK = """
out = {"x": x.numpy(), "f": f.detach().numpy(), "x_hat": x_hat.detach().numpy()}
ours = torch.from_numpy(np.load(X_PATH))
with torch.no_grad():
    out["our_x_f"] = sae.encode(ours).numpy()
    out["our_x_hat"] = sae.decode(sae.encode(ours)).numpy()
    out["our_x_forward"] = sae(ours).numpy()
np.savez(OUT_PATH, **out)
return {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
        "version": sae_lens.__version__, "hook": sae.cfg.metadata.hook_name}
"""

SAEBENCH = """
from sae_lens import SAE
try:
    from sae_bench.sae_bench_utils import general_utils
except ImportError:
    return {"missing": "sae_bench"}
sae = SAE.load_from_disk(SAE_DIR)
with warnings.catch_warnings():
    warnings.simplefilter("error")  # SAEBench only warns about decoder norms
    sae_id, sae, sparsity = general_utils.load_and_format_sae("jumprelu", sae, "cpu")
return {"unit_norm": general_utils.check_decoder_norms(sae.W_dec.data), "hook_layer": sae.cfg.hook_layer,
        "hook_name": sae.cfg.hook_name, "model_name": sae.cfg.model_name, "context_size": sae.cfg.context_size}
"""


def _job(name: str, body: str, **constants) -> str:
    """`body` as a function of the peer script whose failure is reported under `name`, not raised,
    so that one SAE the peer cannot load fails its own test only."""
    lines = [f"{k} = {v!r}" for k, v in constants.items()] + body.strip("\n").splitlines()
    return "def job():\n" + "".join(f"    {line}\n" for line in lines) + f"run({name!r}, job)\n"


PEER_SCRIPT_HEAD = """
import json, traceback, warnings
import numpy as np
import sae_lens

results = {}

def run(name, job):
    try:
        results[name] = json.loads(json.dumps(job()))
    except BaseException:
        results[name] = {"error": traceback.format_exc()[-3000:]}
"""


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Trains one tiny SAE of each kind, exports them (the JumpReLU one a second time with the
    provenance SAEBench reads), and loads them all in one run of the peer interpreter: torch and
    sae_lens take tens of seconds to import, once is enough. Returns our SAEs, the inputs, per
    SAE what the peer computed, and the error of any SAE that could not be trained or exported
    (its own test raises it)."""
    root = tmp_path_factory.mktemp("saelens")
    jobs, ours, inputs, failed = [PEER_SCRIPT_HEAD], {}, {}, {}
    for kind in KINDS:
        config = make_tiny_config()
        if kind != "jumprelu":
            config.sae.update(kind=kind, k=4)
        config.train.steps = 40 if kind == "jumprelu" else 20
        try:
            train(config, str(root / kind))
            ours[kind] = jumprelu.load(str(root / kind))
            saelens.export(ours[kind], str(root / f"{kind}_sl"))
        except Exception as e:
            failed[kind] = e
            continue
        inputs[kind] = np.random.default_rng(0).normal(size=(256, ours[kind].d_model)).astype(np.float32)
        inputs[kind] *= ours[kind].scale
        np.save(root / f"{kind}_x.npy", inputs[kind])
        snippet = readme_snippet().replace(README_DIR, str(root / f"{kind}_sl"))
        jobs.append(_job(kind, snippet + CHECK, X_PATH=str(root / f"{kind}_x.npy"), OUT_PATH=str(root / f"{kind}.npz")))
    if "jumprelu" in failed:
        failed["saebench"] = failed["jumprelu"]
    else:
        provenance = {"model_name": "gemma-2-2b", "hook_name": "blocks.3.hook_resid_post", "context_size": 1024}
        saelens.export(ours["jumprelu"], str(root / "saebench_sl"), provenance=provenance)
        jobs.append(_job("saebench", SAEBENCH, SAE_DIR=str(root / "saebench_sl")))
    jobs.append("print(json.dumps(results))\n")
    run = subprocess.run(
        [PEER, "-c", "".join(jobs)], capture_output=True, text=True, timeout=600, env=dict(os.environ, TQDM_DISABLE="1")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    outputs = {k: dict(np.load(root / f"{k}.npz")) for k in results if k in KINDS and "error" not in results[k]}
    return ours, inputs, results, outputs, failed


@pytest.mark.parametrize("kind", KINDS)
def test_real_saelens_loads_our_export_and_computes_the_same(peer, kind):
    all_ours, inputs, results, outputs, failed = peer
    if kind in failed:
        raise failed[kind]
    info, ours, x = results[kind], all_ours[kind], inputs[kind]
    assert "error" not in info, info.get("error")
    got = outputs[kind]
    assert info["architecture"] == ("topk" if kind == "topk" else "jumprelu"), info
    f = np.asarray(ours.encode(x))
    assert 0 < (f != 0).mean() < 1  # the inputs really exercise the threshold / the top-k
    # float32 tolerance: SAELens's torch matmuls sum in another order than XLA's.
    np.testing.assert_allclose(got["our_x_f"], f, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["our_x_f"] != 0, f != 0)
    np.testing.assert_allclose(got["our_x_hat"], np.asarray(ours(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["our_x_forward"], np.asarray(ours(x)), rtol=1e-5, atol=1e-5)
    # The README snippet's own random inputs.
    np.testing.assert_allclose(got["f"], np.asarray(ours.encode(got["x"])), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["x_hat"], np.asarray(ours(got["x"])), rtol=1e-5, atol=1e-5)


def test_saebench_accepts_our_export(peer):
    """As far as SAEBench runs on a CPU without downloads: its own loader's checks pass."""
    if "saebench" in peer[4]:
        raise peer[4]["saebench"]
    got = peer[2]["saebench"]
    assert "error" not in got, got.get("error")
    if got.get("missing"):
        pytest.skip("sae_bench is not in the peer environment: rerun `bash benchmarks/peers/setup.sh`")
    assert got == {
        "unit_norm": True,
        "hook_layer": 3,
        "hook_name": "blocks.3.hook_resid_post",
        "model_name": "gemma-2-2b",
        "context_size": 1024,
    }
