"""jumprelu: JumpReLU sparse autoencoders in JAX, faithful to Rajamanoharan et al. (2024)."""

from jumprelu.load import SAE, load
from jumprelu.ops import jumprelu, step
from jumprelu.sae import JumpReLUSAE

__all__ = ["SAE", "JumpReLUSAE", "jumprelu", "load", "step"]
