"""The size of an intervention: the change it writes into the residual stream, over the stream's norm.

For every steered layer l and every scored token (the tokens perplexity scores: the tokenizer's
special tokens left out), `||Δ_l|| / ||r_l||`, summed over the steered layers, then averaged over
tokens ("relative norm"):

    Δ_l  what the intervention adds to the residual stream in layer l, on the input that layer
         sees in the steered forward. Neuron and activation sites: the MLP's contribution to the
         stream with the override minus without it: `down(h') - down(h)` = `W_down (h' - h)`, where
         h is the layer's neuron tensor recomputed from the MLP's input by the model's own modules
         and h' the one the down projection received; in Gemma 2 and 3, whose MLP output passes a
         norm (`post_feedforward_layernorm`) before it joins the stream, that norm of each.
         Residual site: the added vector (`add`; an override with mul != 1 there is refused: its
         change would depend on the stream).
    r_l  the residual stream after layer l: the decoder layer's (steered) output.

The intervention acts at every position (`with_positions("all")`), as in perplexity. Measured on
the unpatched model (hooks read the MLP's parts; a `steer.patch`-ed model is refused).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.core.adapters import NeuronLayout, base_inputs, check_eval
from steer.core.intervention import Intervention
from steer.engine.backends import attached
from steer.engine.batching import MAX_TOKENS
from steer.engine.generation import scored_batches


def perturbation(model, tok, texts: Sequence[str], intervention: Intervention | Sequence[Intervention | None], *,
                 batch_size: int = 8, max_tokens: int | None = MAX_TOKENS) -> dict:
    """The relative norm of `intervention` (one, or one per text: per-row steering) on `texts`.

    Returns {"mean": token-weighted mean over all texts, "sums": each text's sum over its scored
    tokens, "counts": its scored tokens} (in input order; sums / counts per text or per group of
    texts give each intervention's mean)."""
    if getattr(attached(model), "kind", None) == "fused":
        raise ValueError("perturbation reads the MLP's own modules: measure on the unpatched model (steer.revert)")
    ivs = list(intervention) if isinstance(intervention, Sequence) else [intervention] * len(texts)
    if len(ivs) != len(texts):
        raise ValueError(f"{len(ivs)} interventions for {len(texts)} texts: give one per text")
    ivs = Intervention.every_position(ivs)
    distinct = list({id(iv): iv for iv in ivs if iv is not None}.values())
    sites = {iv.site for iv in distinct}
    if len(sites) > 1:
        raise ValueError(f"interventions at several sites {sorted(sites)}: measure each site's apart")
    site = next(iter(sites), None)
    layout = NeuronLayout(model)
    layers = sorted({l for iv in distinct for l in torch.nonzero(iv.mask.any(1)).flatten().tolist()})
    if site == "residual":
        for iv in distinct:
            if bool((iv.mul[iv.mask] != 1).any()):
                raise ValueError("a residual override with mul != 1: its change depends on the stream; "
                                 "perturbation measures added vectors (mul 1)")
    check_eval(model)
    sums, counts = [0.0] * len(texts), [0] * len(texts)
    with torch.inference_mode():
        for batch, ids, mask, real, steering in scored_batches(model, tok, texts, ivs if distinct else None,
                                                               batch_size, max_tokens):
            with _Written(layout, layers, site, [ivs[i] for i in batch], ids.shape) as norms, steering:
                model.base_model(**base_inputs(model, ids, mask), use_cache=False)  # no LM head
            ratio = sum((d / r.clamp_min(1e-30) for d, r in norms.pairs()), torch.zeros(ids.shape, device=ids.device))
            for i, row, keep in zip(batch, ratio.double(), real):
                sums[i], counts[i] = float(row[keep].sum()), int(keep.sum())
    return {"mean": sum(sums) / max(sum(counts), 1), "sums": sums, "counts": counts}


class _Written:
    """Hooks for one batch: per steered layer, ||Δ|| and ||r|| per token ([B, T] each)."""

    def __init__(self, layout: NeuronLayout, layers: list[int], site: str | None, ivs: list, shape):
        self.layout, self.layers, self.site, self.ivs, self.shape = layout, layers, site, ivs, shape
        self.delta: dict[int, torch.Tensor] = {}
        self.stream: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def pairs(self):
        return [(self.delta[l], self.stream[l]) for l in self.layers]

    def __enter__(self):
        for l in self.layers:
            self.handles.append(self.layout.decoder_layer(l).register_forward_hook(self._stream(l)))
            if self.site == "residual":
                self.delta[l] = torch.stack([torch.zeros((), device=self.layout.device) if iv is None else
                                             (iv.add[l] * iv.mask[l]).float().norm() for iv in self.ivs])[:, None].expand(self.shape)
            else:
                parts = self.layout.layer_parts(l)
                x: list[torch.Tensor] = []
                post = getattr(self.layout.decoder_layer(l), "post_feedforward_layernorm", None)
                self.handles.append(parts["up"].register_forward_pre_hook(lambda m, args, x=x: x.append(args[0])))
                self.handles.append(parts["down"].register_forward_hook(self._delta(l, parts, x, post is None)))
                if post is not None:
                    self.handles.append(post.register_forward_hook(self._normed(l, x)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _stream(self, l: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.stream[l] = hidden.float().norm(dim=-1).view(self.shape)
        return hook

    def _delta(self, l: int, parts: dict, x: list, joins: bool):
        """The down projection's hook: its output without the override, recomputed from the MLP's
        input; the difference is Δ if the output joins the stream as it is (`joins`), else the
        unsteered output waits in `x` for the norm it passes first (`_normed`)."""
        a = self.layout.adapter

        def hook(module, args, output):
            inp = x.pop()
            if a.merged_gate_up:
                gate, up = parts["up"].forward(inp).chunk(2, dim=-1)
                h = parts["act"].forward(gate) * up
            elif parts["gate"] is not None:
                h = parts["act"].forward(parts["gate"].forward(inp)) * parts["up"].forward(inp)
            else:
                h = parts["act"].forward(parts["up"].forward(inp))
            clean = parts["down"].forward(h)
            if joins:
                self.delta[l] = (output - clean).float().norm(dim=-1).view(self.shape)
            else:
                x.append(clean)
        return hook

    def _normed(self, l: int, x: list):
        def hook(module, args, output):
            self.delta[l] = (output - module.forward(x.pop())).float().norm(dim=-1).view(self.shape)
        return hook
