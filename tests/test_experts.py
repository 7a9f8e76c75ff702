"""Expert selection (both recipes, tie-break, bottom-k, layer filter) and expert-set files."""
import csv
import hashlib
import json
import warnings

import pytest
import torch
import transformers as T

from steer.core.scores import Scores, Split
from steer.core.adapters import NeuronLayout
from steer.engine.collect import _mismatch, collect, model_record, settings_of
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


# ---------------------------------------------------------------------------------------------
# the same weights in any load dtype (NeuronLayout.fingerprint / signature / same_weights)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def weights_record(model):
    """What an expert set records of its model's weights (collect's settings, select_experts)."""
    layout = NeuronLayout(model)
    return {"fingerprint": layout.fingerprint(), "signature": layout.signature(),
            "dtype": str(layout.modules[0].weight.dtype).removeprefix("torch.")}


def old_fingerprint(model):
    """The fingerprint before dtype-independence, written out independently: fp32 bytes of the sample."""
    digest = hashlib.sha256()
    for m in NeuronLayout(model).modules:
        w = m.weight.detach().flatten()
        digest.update(str(tuple(m.weight.shape)).encode())
        digest.update(w[:: max(1, w.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_one_checkpoint_loaded_in_any_dtype_is_the_same_weights(stored, tmp_path):
    tiny_model("llama").to(stored).save_pretrained(tmp_path)
    loads = {dt: T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dt).eval() for dt in DTYPES}
    assert {NeuronLayout(m).modules[0].weight.dtype for m in loads.values()} == set(DTYPES)
    records = {dt: weights_record(m) for dt, m in loads.items()}
    # the hex id is exact for fp32 and bf16 loads (and fp16 loads of a bf16 checkpoint)
    assert records[torch.float32]["fingerprint"] == records[torch.bfloat16]["fingerprint"]
    if stored == torch.bfloat16:
        assert records[torch.float16]["fingerprint"] == records[torch.float32]["fingerprint"]
    for a in DTYPES:
        for b in DTYPES:
            assert NeuronLayout(loads[b]).same_weights(records[a]), (a, b)
    for dt in DTYPES:
        other = tiny_model("llama", seed=1).to(dt)  # another random init, same shapes
        assert not NeuronLayout(other).same_weights(records[torch.float32]), dt
        assert not NeuronLayout(loads[dt]).same_weights(weights_record(other)), dt
    # a small change (0.5% relative, within the signature's tolerance) is other weights where the
    # fingerprint is exact: fp32 and bf16 loads on both sides
    for dt in (torch.float32, torch.bfloat16):
        tuned = tiny_model("llama").to(stored)
        with torch.no_grad():
            for m in NeuronLayout(tuned).modules:
                m.weight.mul_(1 + 0.005 * torch.randn_like(m.weight))
        assert not NeuronLayout(tuned.to(dt)).same_weights(records[torch.float32]), dt


def test_a_set_found_in_bf16_steers_the_model_in_any_dtype_without_a_warning(tmp_path):
    corpus = Corpus(["the cat", "a dog", "le chat", "un chien", "the end", "la fin"], ["en", "en", "fr", "fr", "en", "fr"])
    bf16 = tiny_model("llama").to(torch.bfloat16)
    d = select_experts(collect(bf16, tiny_tokenizer(), corpus, progress=False).score(), k=5).save(tmp_path / "exp")
    meta = json.loads((d / "experts.json").read_text())
    assert meta["dtype"] == "bfloat16" and len(meta["signature"]) == 2 and len(meta["signature"][0]) == 17
    for dt in DTYPES:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ExpertSet.load(d, model=tiny_model("llama").to(dt)).intervention("fr", tiny_model("llama").to(dt))
        with pytest.warns(UserWarning, match=r"same shapes but other weights \(\w+, " + str(dt)[6:] + r"\)$"):
            ExpertSet.load(d, model=tiny_model("llama", seed=1).to(dt))


def test_an_old_set_with_only_the_old_fingerprint_still_loads(found, tmp_path):
    model, _, experts = found  # fp32
    meta = {k: v for k, v in experts.meta.items() if k not in ("signature", "dtype")}
    d = ExpertSet(experts.experts, {**meta, "fingerprint": old_fingerprint(model)}).save(tmp_path / "old")
    assert "signature" not in json.loads((d / "experts.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = ExpertSet.load(d, model=model)  # its own model in its own dtype: no warning
    assert back.rows("fr") == experts.rows("fr")
    # the old hash named the dtype too: another dtype warns, and says why
    with pytest.warns(UserWarning, match="same shapes but other weights .*predates dtype-independent"):
        ExpertSet.load(d, model=tiny_model("llama").to(torch.bfloat16))
    with pytest.warns(UserWarning, match="predates dtype-independent"):
        ExpertSet.load(d, model=tiny_model("llama", seed=1))


def test_a_collection_resumes_only_in_its_own_dtype():
    corpus = Corpus(["the cat", "le chat"], ["en", "fr"])
    fp32, bf16 = tiny_model("llama"), tiny_model("llama").to(torch.bfloat16)
    saved, now = (json.loads(json.dumps(settings_of(model_record(m, NeuronLayout(m)), corpus))) for m in (fp32, bf16))
    assert saved["fingerprint"] == now["fingerprint"]  # the same weights: the dtype tells them apart

    def why(saved, now, model):
        return _mismatch("ckpt", saved, now, {}, {}, NeuronLayout(model).same_weights(saved))

    assert why(saved, saved, fp32) is None
    said = why(saved, now, bf16)
    assert "other settings: dtype: 'float32' in the checkpoint, 'bfloat16' now" in said and "signature" not in said
    other = tiny_model("llama", seed=1)
    assert "from another model: fingerprint" in why(saved, settings_of(model_record(other, NeuronLayout(other)), corpus), other)
    # written before signatures: its fingerprint was the old hash, read in its own dtype
    old = {**{k: v for k, v in saved.items() if k != "signature"}, "fingerprint": old_fingerprint(fp32)}
    assert why(old, saved, fp32) is None
    assert "from another model" in why(old, saved, other)


def test_the_embedding_cache_keys_name_the_dtype(tmp_path):
    from steer.experiments.study.cache import Embedder

    fp32, bf16 = (Embedder(m, tiny_tokenizer(), batch_size=2, skip_bos=True, directory=tmp_path, progress=False)
                  for m in (tiny_model("llama"), tiny_model("llama").to(torch.bfloat16)))
    assert fp32.fingerprint == bf16.fingerprint  # the same weights: the dtype tells their embeddings apart
    assert fp32._file("base", (1, 2)) != bf16._file("base", (1, 2))
    assert (fp32._cache_meta((1,))["dtype"], bf16._cache_meta((1,))["dtype"]) == ("float32", "bfloat16")
