"""Trained SAEs out of a workdir and into other formats: `load` and the file formats."""
