"""Tests of steer.embed (tiny random models built offline) and steer.experiments.analysis (known answers)."""
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from steer.experiments import analysis as A
from steer.engine.embed import embed

WORDS = "the cat dog sat on a mat red blue green fast slow".split()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    config = {
        "llama": LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
        ),
        "gpt2": GPT2Config(
            vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=1, eos_token_id=1,
        ),
    }[request.param]
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )


def _sentences(n=7, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 9))) for _ in range(n)]


def _by_hand(model, ids, skip_first=False, layer=-1):
    """One sentence at a time, no padding, plain mean of the layer's hidden state."""
    rows = []
    with torch.no_grad():
        for s in ids:
            h = model.base_model(input_ids=torch.tensor([s]), output_hidden_states=True)
            rows.append(h.hidden_states[layer][0, 1 if skip_first else 0 :].mean(0))
    return torch.stack(rows)


# --- embed -------------------------------------------------------------------------------


def test_embed_token_ids_match_hand_and_batch_size(model):
    rng = random.Random(1)
    ids = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 12))] for _ in range(7)]
    one = embed(model, None, ids, batch_size=1, progress=False)
    seven = embed(model, None, ids, batch_size=7, progress=False)
    assert one.shape == (7, 32) and one.dtype == torch.float32
    torch.testing.assert_close(one, seven, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seven, _by_hand(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip_bos", [False, True])
def test_embed_padding_side_and_order(model, tokenizer, skip_bos):
    texts = _sentences()
    ids = tokenizer(texts)["input_ids"]
    expected = _by_hand(model, ids, skip_first=skip_bos)
    perm = [3, 0, 6, 1, 5, 2, 4]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        for bs in (1, 3, 7):
            got = embed(model, tokenizer, texts, batch_size=bs, skip_bos=skip_bos, progress=False)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        shuffled = embed(model, tokenizer, [texts[i] for i in perm], batch_size=3,
                         skip_bos=skip_bos, progress=False)
        torch.testing.assert_close(shuffled, expected[perm], atol=1e-5, rtol=1e-5)


def test_embed_skip_bos_only_skips_special_tokens(model):
    ids = [[1, 5, 6], [5, 6]]  # 1 is the config's BOS; the second sentence has none
    got = embed(model, None, ids, skip_bos=True, progress=False)
    hand = _by_hand(model, ids)
    skipped = _by_hand(model, ids[:1], skip_first=True)[0]
    torch.testing.assert_close(got[0], skipped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], hand[1], atol=1e-5, rtol=1e-5)


def test_embed_layers(model):
    ids = [[5, 6, 7], [8, 9]]
    every = embed(model, None, ids, layers="all", progress=False)
    assert sorted(every) == [0, 1, 2]
    torch.testing.assert_close(every[2], embed(model, None, ids, progress=False))
    some = embed(model, None, ids, layers=[0, -1], batch_size=1, progress=False)
    torch.testing.assert_close(some[0], _by_hand(model, ids, layer=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(some[-1], every[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        embed(model, None, ids, layers=[5], progress=False)


def test_embed_applies_active_hooks(model):
    ids = [[5, 6, 7], [8, 9, 10, 11]]
    plain = embed(model, None, ids, progress=False)
    base = model.base_model
    mlp = base.get_submodule("layers.0.mlp" if hasattr(base, "layers") else "h.0.mlp")
    handle = mlp.register_forward_hook(lambda mod, args, out: out * 0)
    try:
        hooked = embed(model, None, ids, progress=False)
        hand = _by_hand(model, ids)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked, hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-3)


def test_embed_refuses_training_mode_and_strings_without_tokenizer(model):
    try:
        with pytest.raises(ValueError, match="eval"):
            embed(model.train(), None, [[5]], progress=False)
    finally:
        model.eval()
    with pytest.raises(ValueError, match="tokenizer"):
        embed(model, None, ["a b"], progress=False)


# --- distances ---------------------------------------------------------------------------


def test_cosine_distance_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [2.0, 2.0], [1.0, 0.0]])
    d = A.cosine_distance(a, b)
    assert d.dtype == torch.float64
    assert d[:3].tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-12)
    assert math.isnan(d[3])


def _three_languages():
    return {  # means: en [1, 0], fr [1, 1], de [0, 1]
        "en": torch.tensor([[1.0, 0.5], [1.0, -0.5]]),
        "fr": torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
        "de": torch.tensor([[0.5, 1.0], [-0.5, 1.0]]),
    }


def test_distance_report_hand_computed():
    embs = _three_languages()
    r = A.distance_report(embs, target="de")
    h = 1 - 1 / math.sqrt(2)  # d([1, 0], [1, 1])
    assert r["pairwise"] == pytest.approx({("en", "fr"): h, ("en", "de"): 1.0, ("fr", "de"): h})
    assert r["mean_pairwise"] == pytest.approx((2 * h + 1) / 3)
    assert r["medoid"] == "fr"  # summed distances: en 1 + h, fr 2h, de 1 + h
    assert r["to_medoid"] == pytest.approx({"en": h, "fr": 0.0, "de": h})
    assert r["to_target"] == pytest.approx({"en": 1.0, "fr": h, "de": 0.0})

    def cos_d(u, v):
        return 1 - (u[0] * v[0] + u[1] * v[1]) / math.hypot(*u) / math.hypot(*v)

    en_fr = (cos_d((1, 0.5), (1, 1)) + cos_d((1, -0.5), (1, 1))) / 2
    en_de = (cos_d((1, 0.5), (0.5, 1)) + cos_d((1, -0.5), (-0.5, 1))) / 2
    assert r["sentence_pairwise"][("en", "fr")] == pytest.approx(en_fr)
    assert r["sentence_pairwise"][("en", "de")] == pytest.approx(en_de)
    assert r["sentence_to_target"]["en"] == pytest.approx(en_de)
    assert r["sentence_to_target"]["de"] == pytest.approx(0.0, abs=1e-12)


def test_identical_spaces_have_zero_distance_and_perfect_retrieval():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    embs = {lang: x.clone() for lang in ("en", "de", "fr", "zh")}
    r = A.distance_report(embs, target="zh")
    assert r["mean_pairwise"] == pytest.approx(0.0, abs=1e-12)
    assert r["mean_sentence_pairwise"] == pytest.approx(0.0, abs=1e-12)
    results = A.retrieval_matrix(embs)
    assert len(results) == 12
    assert all(res["top1"] == 1.0 and res["mrr"] == 1.0 for res in results.values())


def _shifted_space(seed=0, n=100, d=32, offset=5.0):
    """Aligned sentences (shared signal + small noise) with and without a per-language offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    clean = {lang: x + 0.1 * torch.randn(n, d, generator=g) for lang in ("en", "de", "fr")}
    shifted = {}
    for lang, e in clean.items():  # offset `offset` times as long as a row (~sqrt(d))
        u = torch.randn(d, generator=g)
        shifted[lang] = e + offset * math.sqrt(d) * u / u.norm()
    return clean, shifted


def test_planted_shift_is_detected_and_removed_by_centring():
    clean, shifted = _shifted_space()
    before, after = A.distance_report(clean), A.distance_report(shifted)
    assert before["mean_pairwise"] < 0.05 and after["mean_pairwise"] > 0.5
    assert after["mean_sentence_pairwise"] > before["mean_sentence_pairwise"] + 0.5
    assert min(r["top1"] for r in A.retrieval_matrix(clean).values()) == 1.0
    assert max(r["top1"] for r in A.retrieval_matrix(shifted).values()) < 0.5

    centred, centred_clean = A.center(shifted), A.center(clean)
    for lang in centred:
        torch.testing.assert_close(centred[lang].mean(0), torch.zeros(32, dtype=torch.float64))
        # equal up to the fp32 rounding of the shifted input
        torch.testing.assert_close(centred[lang], centred_clean[lang], atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="numerically zero"):
        r = A.distance_report(centred)
    assert math.isnan(r["mean_pairwise"]) and r["medoid"] is None
    assert r["mean_sentence_pairwise"] < 0.05 < after["mean_sentence_pairwise"]
    assert min(res["top1"] for res in A.retrieval_matrix(centred).values()) == 1.0


def test_compare_distances():
    clean, shifted = _shifted_space()
    c = A.compare_distances(A.distance_report(clean, "en"), A.distance_report(shifted, "en"))
    mp = c["mean_pairwise"]
    assert mp["delta"] == pytest.approx(mp["post"] - mp["pre"]) and mp["delta"] > 0.5
    assert set(c["to_target"]) == {"en", "de", "fr"}
    assert c["to_target"]["de"]["delta"] > 0
    assert set(c["medoid"]) == {"pre", "post"} and c["target"] == {"pre": "en", "post": "en"}
    with pytest.raises(ValueError):
        A.compare_distances(A.distance_report(clean, "en"), A.distance_report(clean))


# --- retrieval ---------------------------------------------------------------------------


def test_retrieval_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    r = A.retrieval(q, c)
    assert r["rank"].tolist() == [2, 3, 1]
    assert r["top1"] == pytest.approx(1 / 3)
    assert r["top5"] == 1.0
    assert r["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_retrieval_ties_are_pessimistic():
    q = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    collapsed = torch.ones(6, 4)  # every candidate is the same vector
    r = A.retrieval(q, collapsed)
    assert r["rank"].tolist() == [6] * 6 and r["top1"] == 0.0


def test_random_embeddings_retrieve_at_chance():
    g = torch.Generator().manual_seed(0)
    n = 200
    embs = {lang: torch.randn(n, 64, generator=g) for lang in ("en", "de", "fr", "zh")}
    results = A.retrieval_matrix(embs)
    top1 = sum(r["top1"] for r in results.values()) / len(results)
    mean_rank = torch.cat([r["rank"] for r in results.values()]).double().mean()
    assert top1 < 5 / n
    assert abs(float(mean_rank) - (n + 1) / 2) < 8


def test_setting_pairs_and_chosen_pairs():
    a, b = A.setting_pairs(["en", "de", "fr"], "de")
    assert a == [("de", "en"), ("de", "fr")]
    assert b == [("en", "fr"), ("fr", "en")]
    clean, _ = _shifted_space()
    assert set(A.retrieval_matrix(clean, pairs=a)) == set(a)
    with pytest.raises(KeyError):
        A.setting_pairs(["en", "de"], "zh")


# --- statistics --------------------------------------------------------------------------


def test_paired_bootstrap_covers_planted_change():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(500, generator=g)
    post = pre + 0.2 + 0.5 * torch.randn(500, generator=g)  # true change 0.2
    delta, lo, hi = A.paired_bootstrap(pre, post)
    assert delta == pytest.approx(float(post.mean() - pre.mean()))
    assert lo < 0.2 < hi and lo > 0
    assert hi - lo < 0.15  # pairing removes the between-sentence variance (unpaired: ~0.2)
    assert A.paired_bootstrap(pre, post) == (delta, lo, hi)  # seeded
    assert A.paired_bootstrap(pre, post, seed=1) != (delta, lo, hi)
    assert all(type(x) is float for x in (delta, lo, hi))
    # per-query correctness from retrieval ranks works as values
    d1, _, _ = A.paired_bootstrap(torch.tensor([1, 2, 1, 3]) == 1, torch.tensor([1, 1, 1, 2]) == 1)
    assert d1 == pytest.approx(0.25)
    with pytest.raises(ValueError, match="aligned"):
        A.paired_bootstrap(pre, post[:10])


def test_paired_bootstrap_resamples_the_same_rows():
    # post = pre + a constant: every paired resample moves by exactly that constant, so the CI
    # has zero width; resampling the two sides independently would give a wide one.
    pre = torch.randn(200, generator=torch.Generator().manual_seed(2))
    assert A.paired_bootstrap(pre, pre) == (0.0, 0.0, 0.0)
    delta, lo, hi = A.paired_bootstrap(pre, pre + 0.5)
    assert (delta, lo, hi) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    # a statistic other than the mean is applied to each side of the same resample
    d, lo, hi = A.paired_bootstrap(pre, 2 * pre, stat=lambda x: x.max(-1).values)
    assert d == pytest.approx(float(pre.max())) and lo <= d <= hi


def test_bootstrap_ci_and_custom_stat():
    v = 1.0 + torch.randn(400, generator=torch.Generator().manual_seed(1))
    est, lo, hi = A.bootstrap_ci(v, n_boot=2000)
    assert est == pytest.approx(float(v.mean())) and lo < 1.0 < hi and lo < est < hi
    assert all(type(x) is float for x in (est, lo, hi))
    med, lo, hi = A.bootstrap_ci(v, stat=lambda x: x.median(-1).values)
    assert med == float(v.median()) and lo <= med <= hi
    assert A.bootstrap_ci(torch.full((30,), 2.5)) == (2.5, 2.5, 2.5)  # no spread, no width


def test_bootstrap_ci_width_level_and_seed():
    g = torch.Generator().manual_seed(3)
    small, large = torch.randn(50, generator=g), torch.randn(5000, generator=g)
    _, lo_s, hi_s = A.bootstrap_ci(small)
    est, lo_l, hi_l = A.bootstrap_ci(large)
    assert lo_l < est < hi_l
    # the width shrinks like 1/sqrt(n): ~2 * 1.96 / sqrt(n) for unit variance
    assert hi_s - lo_s == pytest.approx(2 * 1.96 / 50**0.5, rel=0.25)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 / 5000**0.5, rel=0.25)
    _, lo90, hi90 = A.bootstrap_ci(large, level=0.9)
    assert lo_l < lo90 < hi90 < hi_l
    assert A.bootstrap_ci(small, seed=7) == A.bootstrap_ci(small, seed=7) != A.bootstrap_ci(small, seed=8)
    before = torch.get_rng_state()
    A.bootstrap_ci(small)
    assert torch.equal(torch.get_rng_state(), before)  # a private generator


def test_pearson_ci():
    x = torch.arange(12.0)
    assert A.pearson_ci(x, 2 * x + 1) == pytest.approx((1.0, 1.0, 1.0))
    assert A.pearson_ci(x, -x) == pytest.approx((-1.0, -1.0, -1.0))
    g = torch.Generator().manual_seed(0)
    y = x + 3 * torch.randn(12, generator=g)
    r, lo, hi = A.pearson_ci(x, y)
    assert -1 <= lo < r < hi <= 1
    assert all(type(v) is float for v in (r, lo, hi))
    assert A.pearson_ci(x, y, seed=3) == A.pearson_ci(x, y, seed=3)
    with pytest.raises(ValueError):
        A.pearson_ci([1.0, 2.0], [1.0, 2.0])


def test_pearson_ci_leaves_out_resamples_without_r():
    # 4 pairs, one x differs: a resample without row 3 has a constant x and no r; those
    # resamples (~30 %) are left out, so the CI is that of the others and finite.
    x, y = [0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]
    r, lo, hi = A.pearson_ci(x, y, n_boot=2000)
    assert r == pytest.approx(0.7745966692414834)  # sqrt(3/5)
    assert 0 < lo <= hi <= 1 and math.isfinite(lo)


# --- projection --------------------------------------------------------------------------


def _exact_projection(x: torch.Tensor) -> torch.Tensor:
    """Oracle: the centred stack on its two leading right singular vectors (full SVD), each
    signed so that its largest-|loading| component is positive."""
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]
    for i in range(2):
        if axes[i, axes[i].abs().argmax()] < 0:
            axes[i] = -axes[i]
    return centred @ axes.T


def test_project_2d_shapes_and_planar_data():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64)).Q.T  # [2, 10]
    coords = {
        "en": torch.randn(30, 2, generator=g, dtype=torch.float64),
        "de": torch.randn(20, 2, generator=g, dtype=torch.float64) + 3,
    }
    embs = {lang: c @ basis for lang, c in coords.items()}
    proj = A.project_2d(embs)
    assert {lang: tuple(p.shape) for lang, p in proj.items()} == {"en": (30, 2), "de": (20, 2)}
    assert all(p.dtype == torch.float64 for p in proj.values())
    # data on a plane: the projection is a rigid motion, so pairwise distances are kept
    flat = torch.cat(list(proj.values()))
    orig = torch.cat(list(coords.values()))
    torch.testing.assert_close(torch.cdist(flat, flat), torch.cdist(orig, orig))


def test_project_2d_matches_exact_pca():
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0])
    mix = torch.randn(3, 60, generator=g, dtype=torch.float64)
    x = signal @ mix + 0.01 * torch.randn(40, 60, generator=g, dtype=torch.float64)  # rank > 12
    embs = {"en": x[:25].float(), "de": x[25:].float()}
    proj = A.project_2d(embs)
    assert [tuple(p.shape) for p in proj.values()] == [(25, 2), (15, 2)]
    exact = _exact_projection(torch.cat([embs["en"], embs["de"]]).double())
    # the same axes, the same signs (largest-|loading| component positive), not just up to sign
    torch.testing.assert_close(torch.cat(list(proj.values())), exact, atol=1e-8, rtol=1e-8)


def test_project_2d_is_seeded_and_leaves_the_global_rng_alone():
    x = torch.randn(50, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    embs = {"en": x[:20], "de": x[20:]}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = A.project_2d(embs, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = A.project_2d(embs, seed=5)
    for lang in embs:
        assert torch.equal(a[lang], b[lang])
    # noise of full rank: still the exact PCA up to the iteration error, with the sign convention
    exact = _exact_projection(x)
    got = torch.cat(list(A.project_2d(embs, n_iter=30).values()))
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-6)


def test_plot_projection_writes_png(tmp_path):
    clean, shifted = _shifted_space()
    path = A.plot_projection(clean, shifted, tmp_path / "proj.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
