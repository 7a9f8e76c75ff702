"""Dose curves (`steer study --curves`) on a tiny model: the one-batch sweep against dose-by-dose,
the perturbation size against a hand-written oracle, interpolation and the report's sections."""
import json
import math

import pytest
import torch

from steer.core.diffmean import diffmean_intervention
from steer.core.intervention import Intervention
from steer.experiments.perturbation import perturbation
from steer.experiments.study import curves as C
from steer.experiments.study import protocol
from steer.experiments.study.report import render_only

from test_study import _config, fake  # noqa: F401  (the fixture)
from tiny import tiny_model, tiny_tokenizer

METHODS = ["experts", "lape", "diffmean", "random"]
TEXTS = ["lorem ipsum dolor", "sit amet consectetur adipiscing elit", "sed", "do eiusmod tempor incididunt ut"]


def _curves_config(tmp_path, **kw):
    return _config(tmp_path, methods=METHODS, k_grid=[2, 5], curve_k=[2, 4, 8], curve_multipliers=[3.0],
                   lape_rates=[0.05, 0.2], curve_lape_rates=[0.05, 0.2, 0.5], diffmean_scales=[1.0],
                   curve_scales=[0.5, 2.0], n_generate=3, gen_tokens=5, n_heldout=3, n_curve_dev=6,
                   control_seeds=1, paraphrases=False, udhr=False, **kw)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gemma3"), tiny_tokenizer()


def _neuron_iv(scale=1.0):
    return Intervention(2, 48).set(torch.tensor([0, 1, 1]), torch.tensor([3, 5, 40]),
                                   torch.tensor([2.0, -1.0, 0.5]) * scale)


def _rms_norm(norm, y):
    """Gemma's RMSNorm (weight offset by 1), written out."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_perturbation_against_a_hand_written_oracle(family):
    """||Δ|| / ||layer output|| per token, summed over steered layers, Δ = down(h') - down(h) (Gemma:
    through its post-feedforward norm): recomputed here from the MLP's input and weights by hand
    (forced neurons: h' = value at those units)."""
    model, tok = tiny_model(family), tiny_tokenizer()
    iv = _neuron_iv()
    got = perturbation(model, tok, TEXTS, iv, batch_size=3)
    layers = model.model.layers
    mlp_in, outs = {}, {}
    hooks = [layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: mlp_in.__setitem__(l, a[0])) for l in (0, 1)]
    hooks += [layers[l].register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0] if isinstance(o, tuple) else o))
              for l in (0, 1)]
    from steer.engine.steering import intervene

    for i, text in enumerate(TEXTS):
        enc = tok([text], return_tensors="pt")
        with torch.no_grad(), intervene(model, iv):
            model(**enc)
        total = 0.0
        for l in (0, 1):
            mlp = layers[l].mlp
            x = mlp_in[l][0]
            gate = x @ mlp.gate_proj.weight.T
            act = (torch.nn.functional.gelu(gate, approximate="tanh") if family == "gemma3"
                   else gate * torch.sigmoid(gate))
            h = act * (x @ mlp.up_proj.weight.T)
            forced = h.clone()
            sel = iv.mask[l]
            forced[:, sel] = iv.add[l][sel]
            y, y_forced = h @ mlp.down_proj.weight.T, forced @ mlp.down_proj.weight.T
            if family == "gemma3":
                post = layers[l].post_feedforward_layernorm
                y, y_forced = _rms_norm(post, y), _rms_norm(post, y_forced)
            delta = y_forced - y
            ratio = (delta.norm(dim=-1) / outs[l][0].norm(dim=-1)).detach()
            total += float(ratio[1:].sum())  # the BOS is a special token: not scored
        assert got["sums"][i] == pytest.approx(total, rel=1e-5)
        assert got["counts"][i] == enc["input_ids"].shape[1] - 1
    for h in hooks:
        h.remove()
    # residual site: the added vector's norm (strength) over the layer output's norm
    d = diffmean_intervention(torch.nn.functional.normalize(torch.randn(2, 32), dim=1), 1, 3.0)
    hook = layers[1].register_forward_hook(lambda m, a, o: outs.__setitem__(1, o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), intervene(model, d):
        model(**tok([TEXTS[1]], return_tensors="pt"))
    hook.remove()
    want = float((3.0 / outs[1][0, 1:].norm(dim=-1)).sum())  # the steered output of layer 1
    assert perturbation(model, tok, [TEXTS[1]], d)["sums"][0] == pytest.approx(want, rel=1e-5)
    # stronger forcing writes a larger change; none writes nothing
    assert perturbation(model, tok, TEXTS, _neuron_iv(4.0))["mean"] > got["mean"]
    assert perturbation(model, tok, TEXTS, None)["mean"] == 0.0


def test_perturbation_per_row_equals_one_at_a_time_and_refuses_bad_input(tiny):
    model, tok = tiny
    a, b = _neuron_iv(), _neuron_iv(3.0)
    both = perturbation(model, tok, TEXTS, [a, b, None, a])
    for i, iv in enumerate([a, b, None, a]):
        assert both["sums"][i] == pytest.approx(perturbation(model, tok, [TEXTS[i]], iv)["sums"][0], rel=1e-5, abs=1e-9)
    d = diffmean_intervention(torch.ones(2, 32) / 32 ** 0.5, 0, 1.0)
    with pytest.raises(ValueError, match="several sites"):
        perturbation(model, tok, TEXTS[:2], [a, d])
    with pytest.raises(ValueError, match="one per text"):
        perturbation(model, tok, TEXTS, [a])
    scaled = Intervention(2, 32, site="residual").scale(torch.tensor([0]), torch.tensor([1]), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="mul != 1"):
        perturbation(model, tok, TEXTS, scaled)


@pytest.mark.parametrize("site", ["neuron", "residual"])
def test_one_batch_sweep_equals_dose_by_dose(tiny, site):
    """Greedy generation, embeddings, perplexity and perturbation of several doses in one per-row
    batch equal each dose run alone."""
    model, tok = tiny
    from types import SimpleNamespace

    cfg = SimpleNamespace(gen_tokens=6, n_generate=3, seed=0, batch_size=4, skip_bos=True, center=False,
                          languages=["en", "fr"])
    if site == "neuron":
        ivs = [None, _neuron_iv(), _neuron_iv(4.0)]
    else:
        direction = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), dim=1)
        ivs = [diffmean_intervention(direction, 0, 2.0), diffmean_intervention(direction, 1, 8.0)]
    dev = {"en": TEXTS, "fr": [t.upper() for t in TEXTS]}
    runs = [C.Sweep(model, tok, cfg, 2, dev, TEXTS[:3], together=t, sample=False) for t in (True, False)]
    g = [s.generations(ivs) for s in runs]
    assert g[0] == g[1] and g[0][-1] != g[0][0]  # the doses differ; each equals its own run
    for e1, e2 in zip(*(s.embeddings(ivs) for s in runs)):
        for lang in dev:
            torch.testing.assert_close(e1[lang], e2[lang], rtol=1e-4, atol=1e-5)
    for x, y in zip(*(s.nll(ivs) for s in runs)):
        assert x == pytest.approx(y, rel=1e-5)
    for x, y in zip(*(s.perturbations(ivs) for s in runs)):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-9)


def test_seq_rep_matched_and_pareto():
    assert C.seq_rep([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)  # 5 grams, 4 distinct
    assert C.seq_rep([1, 2, 3]) is None
    pts = [{"units": 10, "fraction": 0.1, "ppl_ratio": 1.0}, {"units": 100, "fraction": 0.5, "ppl_ratio": 2.0}]
    lo, mid, hi = C.matched(pts, "units", [5, 10 ** 1.5, 200], measures=("fraction", "ppl_ratio"))
    assert lo is None and hi is None  # outside the curve: not extrapolated
    assert mid["fraction"] == pytest.approx(0.3)  # half way in log units
    assert mid["ppl_ratio"] == pytest.approx(2 ** 0.5)  # the ratio geometrically: sqrt(1.0 x 2.0)
    pts.append({"units": 50, "fraction": 0.4, "ppl_ratio": 3.0})  # worse than the 100-unit point on both
    assert C.pareto(pts) == [0, 1]
    assert C.levels([0.004, 0.0, 0.025, 0.31]) == pytest.approx([0.005, 0.007, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3])


def test_curves_extend_a_methods_study(tmp_path, fake):
    """`--curves` after `--methods` in the same folder: every method's doses on dev, the experts'
    curve equal to its own k run alone, the report's new sections rendered from results.json;
    a folder without a methods study, or another configuration, is refused before the model loads."""
    with pytest.raises(ValueError, match="extends a methods study"):
        protocol.run_study(_curves_config(tmp_path, curves=True))
    protocol.run_study(_curves_config(tmp_path))
    with pytest.raises(ValueError, match="other seed"):
        protocol.run_study(_curves_config(tmp_path, curves=True, seed=1))
    fake.log.clear()
    res = protocol.run_study(_curves_config(tmp_path, curves=True))
    assert all(split != "test" for _, split in fake.log)  # the curves never read the test split
    cur = res["curves"]
    for t in ("fr", "de"):
        c = cur["targets"][t]["curves"]
        assert [p["setting"] for p in c["experts"]] == [{"k": 2}, {"k": 4}, {"k": 8}, {"k": 8, "multiplier": 3.0}]
        assert [p["units"] for p in c["random"]] == [2, 4, 8, 8]
        assert [p["setting"]["top_rate"] for p in c["lape"]] == sorted(p["setting"]["top_rate"] for p in c["lape"])
        assert {k for k in c if k.startswith("diffmean")} == {"diffmean L0", "diffmean L1"}
        for name, points in c.items():
            for p in points:
                assert 0 <= p["fraction"] <= 1 and p["n"] == 3 and p["ppl_ratio"] > 0 and p["perturbation"] >= 0
                assert p["ci95"][0] <= p["fraction"] <= p["ci95"][1]
        assert cur["targets"][t]["base"]["perturbation"] == 0.0
        assert c["experts"][3]["perturbation"] > c["experts"][2]["perturbation"]  # 3x the values
    report = (tmp_path / "out" / "report.md").read_text()
    for section in ("## Dose curves", "### Matched units", "### Matched perturbation", "curves.png"):
        assert section in report, section
    assert (tmp_path / "out" / "curves.png").exists()
    (tmp_path / "out" / "report.md").unlink()
    render_only(tmp_path / "out" / "results.json")
    assert (tmp_path / "out" / "report.md").read_text() == report
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]  # the study is kept
    assert not math.isnan(cur["targets"]["fr"]["base"]["a"])


def test_curve_options_from_the_command_line_and_their_checks():
    from steer.cli import parser
    from steer.cli.study import config_from_args
    from steer.experiments.study.config import as_config

    args = parser().parse_args(["study", "--curves", "--methods", "experts,lape", "--curve-k", "40,20",
                                "--curve-multipliers", "3", "--curve-lape-rates", "0.1", "--curve-scales", "0.5,2",
                                "--n-curve-dev", "6"])
    cfg = config_from_args(args).validate()
    assert cfg.curves and cfg.curve_k == [20, 40] and cfg.curve_multipliers == [3.0]
    assert cfg.curve_lape_rates == [0.1] and cfg.curve_scales == [0.5, 2.0] and cfg.n_curve_dev == 6
    for bad in ({"curve_k": [0]}, {"curve_lape_rates": [1.5]}, {"curve_scales": [-1.0]},
                {"curve_multipliers": [0.0]}, {"n_curve_dev": 500}):
        with pytest.raises(ValueError):
            as_config({"curves": True, **bad}).validate()
