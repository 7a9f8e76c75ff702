"""Expert selection (both recipes, tie-break, bottom-k, layer filter) and expert-set files."""
import csv
import json

import pytest
import torch

from steer.core.scores import Scores, Split
from steer.engine.collect import collect
from steer.core.corpus import Corpus
from steer.core.experts import ExpertSet, export_selfcond, export_statistics, select_experts
from tiny import tiny_model, tiny_tokenizer


def synthetic_scores(ap, auroc, on_mean=None):
    """A Scores table from given [L, M] AP / AUROC for one split named "x"."""
    ap, auroc = ap[None].double(), auroc[None].double()
    stats = {"ap": ap, "auroc": auroc, "on_mean": ap * 10 if on_mean is None else on_mean[None],
             "on_p50": ap * 100, "on_p90": ap * 1000, "off_mean": -ap}
    return Scores(stats, [Split.one_vs_rest("x")], {"model": "m", "fingerprint": "f", "labels": ["x", "y"]})


def test_ties_break_by_other_score_then_layer_unit():
    ap = torch.tensor([[1.0, 0.9, 1.0], [1.0, 1.0, 0.2]])
    auroc = torch.tensor([[0.99, 0.9, 1.0], [1.0, 0.99, 0.3]])
    e = select_experts(synthetic_scores(ap, auroc), k=4).experts["x"]
    # AP 1.0 everywhere but tie broken by AUROC: (0,2)=1.0, (1,0)=1.0 -> by (layer, unit); then 0.99s
    assert list(zip(e["layer"].tolist(), e["unit"].tolist())) == [(0, 2), (1, 0), (0, 0), (1, 1)]
    assert torch.equal(e["value"], torch.tensor([100.0, 100.0, 100.0, 100.0]))


def test_sundar_recipe_auroc_threshold_mean_value_and_bottom_k():
    auroc = torch.tensor([[0.9, 0.4, 0.1], [0.51, 0.5, 0.45]])
    ap = torch.full((2, 3), 0.5)
    on_mean = torch.arange(6.0).view(2, 3).double()
    s = synthetic_scores(ap, auroc, on_mean)
    with pytest.warns(UserWarning, match=r"label 'x': only 2 neurons have finite auroc and AUROC > 0.5"):
        e = select_experts(s, k=6, by="auroc", value="on_mean", min_auroc=0.5, bottom_k=2).experts["x"]
    pairs = list(zip(e["layer"].tolist(), e["unit"].tolist()))
    assert pairs == [(0, 0), (1, 0), (0, 2), (0, 1)]  # 2 with AUROC > 0.5, then lowest AUROC < 0.5
    assert e["sign"].tolist() == [1, 1, -1, -1]
    assert e["value"].tolist() == [0.0, 3.0, 2.0, 1.0]


def test_layer_filter():
    ap = torch.tensor([[1.0, 0.9], [0.5, 0.4]])
    e = select_experts(synthetic_scores(ap, ap), k=2, layers=[1]).experts["x"]
    assert e["layer"].tolist() == [1, 1] and e["unit"].tolist() == [0, 1]
    with pytest.raises(IndexError, match="layers"):
        select_experts(synthetic_scores(ap, ap), k=2, layers=[5])


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    model = tiny_model("llama")
    corpus = Corpus(["the cat", "a dog", "le chat", "un chien", "the end", "la fin"], ["en", "en", "fr", "fr", "en", "fr"])
    scores = collect(model, tiny_tokenizer(), corpus, progress=False).score()
    return model, scores, select_experts(scores, k=5)


def test_expert_set_round_trips_and_steers(found, tmp_path):
    model, scores, experts = found
    d = experts.save(tmp_path / "exp")
    back = ExpertSet.load(d)
    assert back.concepts == ["en", "fr"] and back.meta == experts.meta
    for c in back.concepts:
        for f, t in experts.experts[c].items():
            assert torch.equal(back.experts[c][f], t)
    iv = back.intervention("fr", model, k=3)
    assert len(iv) == 3
    e = back.experts["fr"]
    assert torch.equal(iv.add[e["layer"][:3], e["unit"][:3]], e["value"][:3])
    meta = json.loads((d / "experts.json").read_text())
    assert meta["fingerprint"] and meta["corpus_hash"] and meta["layers"] == 2 and meta["width"] == 48


def test_wrong_model_is_an_error_and_other_weights_a_warning(found):
    _, _, experts = found
    with pytest.raises(ValueError, match="this model has 2 x 128"):
        experts.intervention("en", tiny_model("bloom"))
    with pytest.warns(UserWarning, match="same shapes but other weights"):
        experts.intervention("en", tiny_model("llama", seed=5))


def test_corrupt_expert_file_is_a_clear_error(found, tmp_path):
    d = found[2].save(tmp_path / "exp")
    (d / "experts.safetensors").write_bytes((d / "experts.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot read the expert set"):
        ExpertSet.load(d)
    with pytest.raises(FileNotFoundError, match="not an expert set"):
        ExpertSet.load(tmp_path)


def test_exports(found, tmp_path):
    _, scores, _ = found
    rows = list(csv.DictReader(export_statistics(scores, tmp_path / "stats.csv").open()))
    assert len(rows) == 2 * 2 * 48 and float(rows[7]["ap"]) == pytest.approx(scores.stats["ap"][0].flatten()[7].item(), rel=1e-5)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    d = export_selfcond(scores, tmp_path / "selfcond", names)[1]
    table = list(csv.DictReader((d / "expertise.csv").open()))
    assert list(table[0]) == ["ap", "off_mean", "on_p50", "on_p90", "layer", "unit", "uuid", "concept", "group"]
    assert table[50]["layer"] == names[1] and table[50]["unit"] == "2" and table[50]["concept"] == "fr"
    info = json.loads((d / "expertise_info.json").read_text())
    assert info["total_neurons"] == 96 and len(info["neurons_at_ap"]) == 501
