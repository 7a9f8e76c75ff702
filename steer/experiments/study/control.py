"""Seeds of the study's random-neuron control (`steer.core.experts.random_control`)."""
from __future__ import annotations

import hashlib


def control_seed(seed: int, concept: str, i: int) -> int:
    """The seed of the i-th random-control draw for `concept` in a study seeded with `seed`."""
    return int(hashlib.sha256(f"control:{seed}:{concept}:{i}".encode()).hexdigest()[:8], 16)
