"""Triton kernels of steer, each beside its pure-PyTorch reference.

Installed as `steer.kernels` (see pyproject.toml): the project never exposes a top-level
`kernels` module, which would shadow PyPI's `kernels` package that transformers imports.
"""
