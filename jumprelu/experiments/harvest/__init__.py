"""Packaged harvest configs (`jumprelu harvest --config harvest/gemma2:...`); loaded by path."""
