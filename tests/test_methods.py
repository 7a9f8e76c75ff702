"""LAPE and DiffMean on the engine: their token statistics, selection and interventions.

Oracles are independent of steer's hooks and kernels: activations recomputed from the gate / up
projections' outputs with each family's own activation function (tests/tiny.py), hidden states
from Hugging Face's `output_hidden_states`, hand-written forward hooks for the interventions, and
a line-by-line transcription of the LAPE authors' identify.py for the selection.
"""
import math

import pytest
import torch
from tiny import ACT, FAMILIES, tiny_model, tiny_tokenizer

from steer.core.adapters import NeuronLayout
from steer.core.corpus import Corpus
from steer.core.diffmean import diffmean_directions, diffmean_intervention
from steer.core.lape import LapeNeurons, lape_intervention, select_lape
from steer.core.scores import Responses
from steer.core.stream import StreamState
from steer.core.token_stats import TokenStats
from steer.engine.steering import intervene
from steer.engine.collect import collect, collect_stream
from steer.engine.patch import patch
from steer.find import find_experts

TEXTS = ["a b c d e", "f g h", "i j k l m n o", "p q", "r s t u", "v w x y z a", "b c", "d e f g h i"]
LABELS = ["fr", "de", "fr", "en", "de", "en", "fr", "de"]


def corpus():
    return Corpus(texts=TEXTS, labels=LABELS, keys=[f"s{i}" for i in range(len(TEXTS))])


def _oracle_sums(model, family, tok):
    """Per label: tokens, positive-activation counts, activation sums [L, M] and decoder-layer output
    sums [L, D], from each sentence run alone (no padding), every real token counted."""
    layout = NeuronLayout(model)
    a = layout.adapter
    grabbed = {}
    handles = []
    for layer in range(layout.n_layers):
        parts = layout.layer_parts(layer)
        source = parts["up"] if a.gate is None and not a.merged_gate_up else (parts["up"] if a.merged_gate_up else parts["gate"])
        handles.append(source.register_forward_hook(lambda m, i, o, l=layer: grabbed.__setitem__(("pre", l), o)))
        handles.append(layout.decoder_layer(layer).register_forward_hook(
            lambda m, i, o, l=layer: grabbed.__setitem__(("out", l), o[0] if isinstance(o, tuple) else o)))
    out = {}
    try:
        for text, label in zip(TEXTS, LABELS):
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                hidden = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
            n, L, M = ids.shape[1], layout.n_layers, layout.width
            pre = torch.stack([grabbed[("pre", l)].reshape(n, -1) for l in range(L)])  # [L, n, M or 2M]
            if a.merged_gate_up:
                pre = pre[..., :M]  # Phi-3: the gate half first
            act = ACT[family](pre.double())  # [L, n, M]
            resid = torch.stack([grabbed[("out", l)].reshape(n, -1) for l in range(L)]).double()  # [L, n, D]
            for l in range(L - 1):  # the hook's output is Hugging Face's hidden state l + 1
                torch.testing.assert_close(resid[l], hidden[l + 1][0].double())
            o = out.setdefault(label, [0, 0, 0, 0])
            o[0] += n
            o[1] = o[1] + (act > 0).sum(1)
            o[2] = o[2] + act.sum(1)
            o[3] = o[3] + resid.sum(1)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_token_statistics_equal_a_direct_count(family, backend):
    model, tok = tiny_model(family).eval(), tiny_tokenizer()
    r = collect(model, tok, corpus(), token_stats=("activation", "residual"), backend=backend, batch_size=3,
                skip_special=False, progress=False)
    ts, want = r.token_stats, _oracle_sums(model, family, tok)
    for c, name in enumerate(ts.label_names):
        n, pos, total, resid = want[name]
        assert int(ts.tokens[c]) == n
        assert torch.equal(ts.act_pos[c], pos.long())
        torch.testing.assert_close(ts.act_sum[c], total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ts.resid_sum[c], resid, rtol=1e-5, atol=1e-4)
    prob, mean = ts.activation_probability(), ts.residual_mean()
    c = ts.label_names.index("fr")
    torch.testing.assert_close(prob[c], want["fr"][1].double() / want["fr"][0])
    torch.testing.assert_close(mean[c], want["fr"][3] / want["fr"][0], rtol=1e-5, atol=1e-5)


def test_merge_equals_single_pass_and_survives_files(tmp_path):
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    c = corpus()
    whole = collect(model, tok, c, token_stats=("activation", "residual"), progress=False).token_stats
    first, second = (collect(model, tok, c.subset([i for i in range(len(c)) if (i < 4) == half]),
                             token_stats=("activation", "residual"), progress=False).token_stats
                     for half in (True, False))
    merged = first.merge(second)
    assert torch.equal(merged.tokens, whole.tokens) and torch.equal(merged.act_pos, whole.act_pos)
    torch.testing.assert_close(merged.act_sum, whole.act_sum)
    torch.testing.assert_close(merged.resid_sum, whole.resid_sum)
    # stream mode keeps the same sums beside its histograms, through a file
    state = collect_stream(model, tok, c, token_stats=("activation", "residual"), calibration=3, batch_size=2,
                           progress=False)
    assert torch.equal(state.token_stats.act_pos, whole.act_pos)
    torch.testing.assert_close(state.token_stats.resid_sum, whole.resid_sum)
    state.save(tmp_path / "s.stream")
    back = StreamState.load(tmp_path / "s.stream")
    assert torch.equal(back.token_stats.act_pos, whole.act_pos)
    twice = StreamState.load(tmp_path / "s.stream").merge(back)
    assert torch.equal(twice.token_stats.tokens, 2 * whole.tokens)
    # exact mode's responses file carries them too
    r = collect(model, tok, c, token_stats=("activation",), progress=False)
    r.save(tmp_path / "r.safetensors")
    loaded = Responses.load(tmp_path / "r.safetensors").token_stats
    assert loaded.kinds == ("activation",) and torch.equal(loaded.act_pos, r.token_stats.act_pos)


def test_find_experts_collects_token_stats_in_the_same_pass():
    model, tok = tiny_model("gemma3").eval(), tiny_tokenizer()
    for mode in ("exact", "stream"):
        found = find_experts(model, tok, corpus(), k=5, mode=mode, token_stats=("residual",), calibration=4,
                             progress=False)
        assert found.token_stats.kinds == ("residual",) and int(found.token_stats.tokens.sum()) > 0


def test_collect_token_stats_alone_equals_collect():
    model, tok = tiny_model("qwen3").eval(), tiny_tokenizer()
    from steer.engine.collect import collect_token_stats

    alone = collect_token_stats(model, tok, corpus(), ("activation", "residual"), batch_size=3, progress=False)
    full = collect(model, tok, corpus(), token_stats=("activation", "residual"), batch_size=3, progress=False)
    for key, t in alone.tensors().items():
        assert torch.equal(t, full.token_stats.tensors()[key]), key
    with pytest.raises(ValueError, match="needs kinds"):
        collect_token_stats(model, tok, corpus(), ())


def test_bad_token_stats_are_refused_before_any_forward():
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    with pytest.raises(ValueError, match="token_stats"):
        collect(model, tok, corpus(), token_stats=("gate",), progress=False)
    with pytest.raises(ValueError, match="declared adapters"):
        collect(model, tok, corpus(), token_stats=("activation",), neuron_module=r"layers\.\d+\.mlp\.down_proj",
                progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        TokenStats(["a", "b"], ["residual"], 1, 2, 3).residual_mean()


# --- LAPE selection: a transcription of the authors' identify.py --------------------------------

def _identify_py(activation_probs_lik, top_rate, filter_rate, activation_bar_ratio):
    """RUCAIBox/Language-Specific-Neurons identify.py, its tensor steps as written there ([L, I, K])."""
    activation_probs = activation_probs_lik
    normed_activation_probs = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed_activation_probs[torch.isnan(normed_activation_probs)] = 0
    log_probs = torch.where(normed_activation_probs > 0, normed_activation_probs.log(), 0)
    entropy = -torch.sum(normed_activation_probs * log_probs, dim=-1)
    largest = False
    flattened_probs = activation_probs.flatten()
    top_prob_value = flattened_probs.kthvalue(round(len(flattened_probs) * filter_rate)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    entropy[top_position == 0] = -torch.inf if largest else torch.inf
    flattened_entropy = entropy.flatten()
    top_entropy_value = round(len(flattened_entropy) * top_rate)
    _, index = flattened_entropy.topk(top_entropy_value, largest=largest)
    row_index = index // entropy.size(1)
    col_index = index % entropy.size(1)
    selected_probs = activation_probs[row_index, col_index]
    selected_probs = selected_probs.transpose(0, 1)
    activation_bar = flattened_probs.kthvalue(round(len(flattened_probs) * activation_bar_ratio)).values.item()
    lang, indice = torch.where(selected_probs > activation_bar)
    merged_index = torch.stack((row_index, col_index), dim=-1)
    final = {}
    for k in range(activation_probs.shape[-1]):
        final[k] = sorted(tuple(merged_index[i].tolist()) for i in indice[lang == k])
    return final


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rates", [(0.05, 0.95, 0.95), (0.1, 0.9, 0.8)])
def test_select_lape_matches_the_reference_code(seed, rates):
    g = torch.Generator().manual_seed(seed)
    C, L, M = 4, 3, 50
    prob = torch.rand(C, L, M, generator=g, dtype=torch.float64) ** 3  # distinct values: no ties
    prob[:, 0, :5] = 0.0  # a few silent neurons: 0 / 0 normalisation, dropped by the filter
    prob[:, 2, 7] = torch.tensor([1e-3, 0.99, 2e-3, 3e-3], dtype=torch.float64)  # one clear specialist
    names = ["en", "fr", "de", "zh"]
    got = select_lape(prob, names, top_rate=rates[0], filter_rate=rates[1], activation_bar_ratio=rates[2])
    want = _identify_py(prob.permute(1, 2, 0).clone(), *rates)
    for c, name in enumerate(names):
        layers, units = got.neurons[name]
        assert list(zip(layers.tolist(), units.tolist())) == want[c]
    assert (2, 7) in list(zip(*[t.tolist() for t in got.neurons["fr"]]))
    assert got.sizes() == {n: len(want[c]) for c, n in enumerate(names)}


def test_select_lape_errors():
    with pytest.raises(ValueError, match="two or more"):
        select_lape(torch.rand(1, 2, 3), ["en"])
    with pytest.raises(ValueError, match="top_rate"):
        select_lape(torch.rand(2, 2, 3), ["en", "fr"], top_rate=0.0)


# --- the interventions against hand-written hooks -----------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _steered_logits(model, iv, ids, backend, rows=None):
    """Logits with `iv` applied through the hooks or the fused patch."""
    if backend == "fused":
        with patch(model), intervene(model, iv, rows=rows):
            return _logits(model, ids)
    with intervene(model, iv, rows=rows):
        return _logits(model, ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_activation_site_override_equals_a_hook_on_the_activation(family, backend):
    model = tiny_model(family).eval()
    layout = NeuronLayout(model)
    L, M = layout.n_layers, layout.width
    found = LapeNeurons(["fr", "de"], {"fr": (torch.tensor([0, 0, 1]), torch.tensor([3, 9, 4])),
                                       "de": (torch.tensor([1, 1]), torch.tensor([4, 20]))}, {})
    mean = torch.randn(2, L, M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    iv = lape_intervention(found, mean, activate="fr", deactivate=["de"])
    ids = torch.tensor([[1, 5, 9, 14, 7, 3]])

    def hand(layer):
        def hook(module, args, output):
            out = output.clone()
            if layer == 1:
                out[..., 20] = 0.0  # de's neurons zeroed; unit 4 is both: activated
            for l, u in ((0, 3), (0, 9), (1, 4)):
                if l == layer:
                    out[..., u] = mean[0, l, u].float()
            return out
        return hook

    handles = [layout.layer_parts(l)["act"].register_forward_hook(hand(l)) for l in range(L)]
    want = _logits(model, ids)
    for h in handles:
        h.remove()
    assert not torch.allclose(want, _logits(model, ids))  # the hook changed something
    torch.testing.assert_close(_steered_logits(model, iv, ids, backend), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "bloom", "opt"])
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_diffmean_equals_a_residual_hook(family, backend):
    model = tiny_model(family).eval()
    layout = NeuronLayout(model)
    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, layout.n_layers, layout.hidden, generator=g, dtype=torch.float64)
    names = ["en", "fr", "de"]
    dirs = diffmean_directions(means, names, "fr")
    want_dir = means[1] - (means[0] + means[2]) / 2
    torch.testing.assert_close(dirs, (want_dir / want_dir.norm(dim=1, keepdim=True)).float())
    torch.testing.assert_close(diffmean_directions(means, names, "fr", source="de")[1],
                               ((means[1, 1] - means[2, 1]) / (means[1, 1] - means[2, 1]).norm()).float())
    layer, strength = 0, 3.5
    iv = diffmean_intervention(dirs, layer, strength)
    ids = torch.tensor([[1, 5, 9, 14, 7, 3], [1, 8, 8, 2, 6, 4]])

    def hand(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + strength * dirs[layer],) + tuple(output[1:])
        return output + strength * dirs[layer]

    before = _logits(model, ids)
    h = layout.decoder_layer(layer).register_forward_hook(hand)
    want = _logits(model, ids)
    h.remove()
    assert not torch.allclose(want, before)  # the hand-written hook changed something
    torch.testing.assert_close(_steered_logits(model, iv, ids, backend), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(model, ids), before)  # removed: the model as before
    # Hugging Face's hidden state layer + 1 is the steered output (the hook runs before its capture)
    with intervene(model, iv), torch.no_grad():
        steered = model(ids, output_hidden_states=True).hidden_states[layer + 1]
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(steered - plain, (strength * dirs[layer]).expand_as(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_per_row_sets_at_the_other_sites_equal_each_row_alone(family, backend):
    """InterventionSets at the activation or residual site: each row of a batch steered by its own
    set equals that row run alone with its Intervention (a row with no set: the plain model)."""
    from steer.core.intervention import Intervention, InterventionSets

    model = tiny_model(family).eval()
    layout = NeuronLayout(model)
    g = torch.Generator().manual_seed(5)
    means = torch.randn(3, layout.n_layers, layout.hidden, generator=g, dtype=torch.float64)
    names = ["en", "fr", "de"]
    residual = [diffmean_intervention(diffmean_directions(means, names, t), 1, 2.0) for t in ("fr", "de")]
    found = LapeNeurons(names, {"fr": (torch.tensor([0, 1]), torch.tensor([2, 7])),
                                "de": (torch.tensor([1]), torch.tensor([11])), "en": (torch.tensor([0]), torch.tensor([5]))}, {})
    act_mean = torch.randn(3, layout.n_layers, layout.width, generator=g, dtype=torch.float64)
    activation = [lape_intervention(found, act_mean, activate=t, deactivate=["en"]) for t in ("fr", "de")]
    ids = torch.tensor([[1, 5, 9, 14, 7, 3], [1, 8, 8, 2, 6, 4], [1, 3, 3, 3, 9, 9]])
    for ivs in (residual, activation):
        sets = InterventionSets.of(ivs)
        rows = sets.rows([1, None, 0])
        got = _steered_logits(model, sets, ids, backend, rows=rows)
        for b, which in enumerate([1, None, 0]):
            alone = _logits(model, ids[b:b + 1]) if which is None else _steered_logits(model, ivs[which], ids[b:b + 1], backend)
            torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one batch steers one site"):
        InterventionSets.of([activation[0], Intervention.for_model(model).zero(0, [1])])


def test_site_errors_and_directions_errors():
    model = tiny_model("llama").eval()
    layout = NeuronLayout(model)
    on_meta = diffmean_intervention(torch.ones(layout.n_layers, layout.hidden), 0, 1.0, device="meta")
    with pytest.raises(ValueError, match="build it there"):
        intervene(model, on_meta)
    wrong = diffmean_intervention(torch.ones(layout.n_layers, layout.width), 0, 1.0)  # MLP width at the residual
    with pytest.raises(ValueError, match="residual"):
        intervene(model, wrong)
    with pytest.raises(ValueError, match="site"):
        from steer.core.intervention import Intervention
        Intervention(2, 3, site="attention")
    means = torch.zeros(2, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="equal"):
        diffmean_directions(means, ["en", "fr"], "fr")
    with pytest.raises(ValueError, match="not among"):
        diffmean_directions(means, ["en", "fr"], "de")
    assert not math.isnan(float(diffmean_directions(torch.randn(2, 1, 4), ["en", "fr"], "fr", "en").sum()))
