"""Choosing k (and the read-out layer) from dev records only."""
from __future__ import annotations

import numpy as np

from steer.experiments.analysis import TIE_TOL
from steer.experiments.study.measures import criterion_value


def choose(records: list[dict], targets: list[str], criterion: str, layer_search: bool,
           default_layer: int) -> dict:
    """Pick k per target (and, with `layer_search`, one read-out layer for all) from dev records.

    records: {"split", "target", "k", "layer", "a", "b"} (k = 0: the unsteered model). Only
    records with split == "dev" are accepted. k maximises the criterion (ties: the smaller k);
    the layer maximises the mean over targets of the best-k criterion (ties: the later layer).
    Values within `analysis.TIE_TOL` of the best are ties: means of hit fractions summed in another
    order may differ in the last bit, and no choice may follow that.
    """
    if any(r["split"] != "dev" for r in records):
        raise ValueError("choose() accepts dev records only")
    def value(r):
        return criterion_value(r, criterion)

    layers = sorted({r["layer"] for r in records}) if layer_search else [default_layer]

    def best(target, layer):
        cands = [r for r in records if r["target"] == target and r["layer"] == layer and r["k"] > 0]
        if not cands:
            raise ValueError(f"no dev records for target {target!r} at layer {layer}")
        top = max(value(r) for r in cands)
        return min((r for r in cands if value(r) >= top - TIE_TOL), key=lambda r: r["k"])

    layer_score = {l: float(np.mean([value(best(t, l)) for t in targets])) for l in layers}
    top = max(layer_score.values())
    layer = max(l for l in layers if layer_score[l] >= top - TIE_TOL)
    chosen = {t: best(t, layer) for t in targets}
    pre = {t: next(r for r in records if r["target"] == t and r["layer"] == layer and r["k"] == 0) for t in targets}
    return {
        "k": {t: chosen[t]["k"] for t in targets},
        "layer": layer,
        "criterion": criterion,
        "dev_value": {t: value(chosen[t]) for t in targets},
        "dev_pre_value": {t: value(pre[t]) for t in targets},
        "layer_scores": {str(l): s for l, s in layer_score.items()} if layer_search else None,
        "rule": ("k per target maximises the dev criterion (mean top-1 over setting (a) pairs"
                 + (" averaged with setting (b)" if criterion == "ab" else "") + "); ties: smaller k"
                 + ("; layer maximises the mean over targets of the best-k dev criterion" if layer_search
                    else "; layer fixed by the configuration")),
    }



def choose_setting(records: list[dict], criterion: str) -> dict:
    """The setting of one method and target with the best dev criterion among `records` (each
    {"split": "dev", "setting", "a", "b"}, in grid order, weakest first); values within TIE_TOL
    of the best are ties, won by the earlier (weaker) setting."""
    if not records or any(r["split"] != "dev" for r in records):
        raise ValueError("choose_setting() needs dev records")
    top = max(criterion_value(r, criterion) for r in records)
    return next(r for r in records if criterion_value(r, criterion) >= top - TIE_TOL)
