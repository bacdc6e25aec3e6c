"""The SAE itself, in JAX and Flax only (no I/O): the custom_vjp ops, the shared SAE module, the
kinds registry and each kind, the losses, the layout declaration and the folded SAE."""
