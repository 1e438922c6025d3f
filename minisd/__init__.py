"""minisd: a minimal, readable Stable Diffusion whose cross-attention exposes its maps and runs Attention Regulation
inline."""
__version__ = "0.2.0"
