"""Running models: the one backend protocol and everything that drives forward passes.

`backends` (the protocol, hooks) and `patch` (the fused backend) apply interventions and pool
neuron responses; `batching` turns texts into padded batches; `collect` (exact and streaming
collection, refine, checkpoints), `distributed`, `embed`, `generation` and `models` (loading)
build on them. Modules here import `steer.core` and `steer.kernels`, never `steer.experiments`
or `steer.cli`.
"""
