"""SUPIR's networks, built from diffusers / transformers building blocks."""
