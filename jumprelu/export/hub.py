"""Hugging Face Hub upload: a SAELens directory with a model card, pushed with `huggingface_hub`.

The pushed repository is laid out as SAELens releases are, one SAE per folder:

  README.md            the model card (what was trained on what, held-out metrics, how to load)
  <sae_id>/cfg.json, <sae_id>/sae_weights.safetensors

so that `sae_lens.SAE.from_pretrained(release="REPO", sae_id="<sae_id>")` loads it; sae_id is the
hook name (e.g. blocks.12.hook_resid_post), or "sae" when the site has none. huggingface_hub is
an optional dependency (pip install 'jumprelu[hub]'), imported only to push.
"""

from __future__ import annotations

import json

from jumprelu import fs
from jumprelu.errors import UserError
from jumprelu.export import hooks, saelens


def sae_id(provenance: dict) -> str:
    return provenance.get("hook_name") or "sae"


def model_card(sae, repo: str, provenance: dict, report: dict) -> str:
    p, e = provenance, report.get("eval") or {}
    sid = sae_id(p)
    kind = (sae.config.get("sae") or {}).get("kind", "jumprelu")
    lam = (sae.config.get("sae") or {}).get("sparsity_coefficient")
    rows = [
        ("model", p.get("hf_model") or "unknown"),
        ("hook", p.get("hook_name") or "none"),
        ("architecture", f"{kind} (SAELens: {'topk' if sae.k is not None else 'jumprelu'})"),
        ("d_in × width", f"{sae.d_model} × {sae.width}"),
        ("training steps", f"{sae.step:,}"),
        ("sparsity coefficient λ", "n/a" if lam is None else f"{lam:g}"),
        ("training data", p.get("dataset") or "unknown"),
    ]
    for key, label in (("l0", "held-out L0"), ("fvu", "held-out FVU"), ("dead_fraction", "dead latents")):
        if key in e:
            rows.append((label, f"{e[key]:.4g}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tags = ["sae_lens", "sparse-autoencoder", "jumprelu", "interpretability"]
    base = p.get("hf_model")
    front = ["---", "library_name: saelens", "tags:", *[f"- {t}" for t in tags]]
    if base and "/" in base:
        front.append(f"base_model: {base}")
    front.append("---")
    return "\n".join(
        [
            *front,
            "",
            f"# {repo}",
            "",
            "A sparse autoencoder trained with jumprelu (JAX/Flax), exported in",
            "the SAELens format. Parameters are folded: the SAE takes raw activations (no input",
            "normalisation, `apply_b_dec_to_input: false`).",
            "",
            "| | |",
            "|---|---|",
            table,
            "",
            "## Load it",
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f'sae = SAE.from_pretrained(release="{repo}", sae_id="{sid}")',
            "```",
            "",
            "or, with jumprelu (plain JAX):",
            "",
            "```python",
            "import jumprelu",
            "from huggingface_hub import snapshot_download",
            "",
            f'sae = jumprelu.load(snapshot_download("{repo}") + "/{sid}")',
            "```",
            "",
        ]
    )


def write_repo_dir(sae, path: str, repo: str, report: dict | None = None) -> str:
    """Writes the directory `push` uploads: the model card and the SAELens folder. Returns sae_id."""
    p = hooks.provenance(sae.config)
    sid = sae_id(p)
    saelens.export(sae, fs.join(path, sid), provenance=p)
    fs.write_text_atomically(fs.join(path, "README.md"), model_card(sae, repo, p, report or {}))
    fs.write_text_atomically(fs.join(path, "jumprelu_export.json"), json.dumps({"sae_id": sid, "repo": repo}))
    return sid


def require_client():
    """The huggingface_hub module, or a one-line error saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--hub needs huggingface_hub: pip install 'jumprelu[hub]'") from None
    return huggingface_hub


def push(path: str, repo: str) -> str:
    """Uploads the directory to the Hub repository `repo` (created if missing); returns its URL."""
    api = require_client().HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=path, repo_id=repo, commit_message="jumprelu export")
    return f"https://huggingface.co/{repo}"
