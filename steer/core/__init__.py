"""The data and semantics of steer, without running a model.

Neuron sites per MLP family (`adapters`), interventions and their positions (`intervention`),
exact per-neuron metrics (`metrics`), the fixed-memory histogram state (`stream`), typed scores
(`scores`), expert sets (`experts`), corpora (`corpus`), the one artifact format (`artifacts`)
and the machine's defaults (`runtime`). Modules here import only each other and `steer.kernels`.
"""
