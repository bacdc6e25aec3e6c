"""Our SAELens export, loaded by the real sae_lens package: its encode/decode equal ours.

SAELens (and torch) are never dependencies of jumprelu: they live in the peer virtualenv that
`bash benchmarks/peers/setup.sh` makes (.ci/run runs it first), and this test drives that
interpreter in a subprocess. It runs the README's "Using your SAE elsewhere" SAELens snippet
verbatim (only the directory replaced), then encodes inputs of ours with the same SAE.
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


CHECK = """
import json, sys
import numpy as np
import sae_lens

out = {"x": x.numpy(), "f": f.detach().numpy(), "x_hat": x_hat.detach().numpy()}
ours = torch.from_numpy(np.load(sys.argv[1]))
with torch.no_grad():
    out["our_x_f"] = sae.encode(ours).numpy()
    out["our_x_hat"] = sae.decode(sae.encode(ours)).numpy()
    out["our_x_forward"] = sae(ours).numpy()
np.savez(sys.argv[2], **out)
print(json.dumps({"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                  "version": sae_lens.__version__, "hook": sae.cfg.metadata.hook_name}))
"""


def _saelens_outputs(directory, x, tmp_path):
    script = readme_snippet().replace(README_DIR, str(directory)) + CHECK
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [PEER, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), dict(np.load(tmp_path / "out.npz"))


@pytest.mark.parametrize("kind", ["jumprelu", "batchtopk", "topk"])
def test_real_saelens_loads_our_export_and_computes_the_same(tmp_path, tiny_config, kind):
    if kind != "jumprelu":
        tiny_config.sae.update(kind=kind, k=4)
    tiny_config.train.steps = 40 if kind == "jumprelu" else 20
    train(tiny_config, str(tmp_path / "run"))
    ours = jumprelu.load(str(tmp_path / "run"))
    saelens.export(ours, str(tmp_path / "sl"))
    x = np.random.default_rng(0).normal(size=(256, ours.d_model)).astype(np.float32) * ours.scale
    info, got = _saelens_outputs(tmp_path / "sl", x, tmp_path)
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


SAEBENCH = """
import json, sys, warnings
from sae_lens import SAE
try:
    from sae_bench.sae_bench_utils import general_utils
except ImportError:
    print(json.dumps({"missing": "sae_bench"}))
    sys.exit(0)
sae = SAE.load_from_disk(sys.argv[1])
with warnings.catch_warnings():
    warnings.simplefilter("error")  # SAEBench only warns about decoder norms
    sae_id, sae, sparsity = general_utils.load_and_format_sae("jumprelu", sae, "cpu")
print(json.dumps({"unit_norm": general_utils.check_decoder_norms(sae.W_dec.data), "hook_layer": sae.cfg.hook_layer,
                  "hook_name": sae.cfg.hook_name, "model_name": sae.cfg.model_name,
                  "context_size": sae.cfg.context_size}))
"""


def test_saebench_accepts_our_export(tmp_path, tiny_config):
    """As far as SAEBench runs on a CPU without downloads: its own loader's checks pass."""
    train(tiny_config, str(tmp_path / "run"))
    ours = jumprelu.load(str(tmp_path / "run"))
    provenance = {"model_name": "gemma-2-2b", "hook_name": "blocks.3.hook_resid_post", "context_size": 1024}
    saelens.export(ours, str(tmp_path / "sl"), provenance=provenance)
    run = subprocess.run([PEER, "-c", SAEBENCH, str(tmp_path / "sl")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got.get("missing"):
        pytest.skip("sae_bench is not in the peer environment: rerun `bash benchmarks/peers/setup.sh`")
    assert got == {
        "unit_norm": True,
        "hook_layer": 3,
        "hook_name": "blocks.3.hook_resid_post",
        "model_name": "gemma-2-2b",
        "context_size": 1024,
    }
