"""jumprelu: JumpReLU sparse autoencoders in JAX, faithful to Rajamanoharan et al. (2024).

The public surface, imported lazily (PEP 562) so that `import jumprelu` costs nothing until a
name is used:

  load(path, step=None, member=None) -> SAE   a trained SAE (workdir, stacked member), or a released
                                              layout (params.npz, SAELens dir, Gemma Scope 2 folder)
  SAE                                         the folded SAE: encode, decode, __call__, params()
  JumpReLUSAE                                 the Flax module trained on normalised inputs
  jumprelu(z, θ, ε), heaviside(z, θ, ε)       the custom_vjp ops with the rectangle-kernel STE
  base_config()                               the experiment config with the paper's defaults

Everything else lives in the subpackages: core, data, store, train, evaluate, export, harvest,
launch, cli.
"""

from __future__ import annotations

import importlib

# name -> (module, attribute)
_PUBLIC = {
    "load": ("jumprelu.export.load", "load"),
    "SAE": ("jumprelu.core.folded", "SAE"),
    "JumpReLUSAE": ("jumprelu.core.kinds.jumprelu", "JumpReLUSAE"),
    "jumprelu": ("jumprelu.core.ops", "jumprelu"),
    "heaviside": ("jumprelu.core.ops", "heaviside"),
    "base_config": ("jumprelu.config", "base_config"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jumprelu' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
