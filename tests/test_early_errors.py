"""Bad inputs fail early, in one line naming the value, before any forward pass (issue 17).

Training mode, k, single-label corpora and swapped TSV columns; warnings name labels, not split
indices. Forward passes are counted by a pre-hook on the base model (collect, collect_stream,
refine and embed all run it).
"""
import warnings

import pytest
import torch

from steer.core.scores import Responses
from steer.engine.collect import collect, collect_stream, refine
from steer.core.corpus import Corpus, from_tsv, open_corpus
from steer.engine.embed import embed
from steer.core.experts import check_k, random_control, select_experts
from steer.experiments.language_sweep import language_steering
from steer.core.metrics import score_splits
from tiny import tiny_model, tiny_tokenizer

TRAINING = r"model is in training mode \(dropout is active\): call model\.eval\(\) first"
TEXTS = ["the cat", "a dog", "le chat", "un chien", "the end", "la fin", "a bird", "un oiseau"]
LABELS = ["en", "en", "fr", "fr", "en", "fr", "en", "fr"]
STREAM = dict(bins=4, calibration=4, batch_size=4, progress=False)


def forwards(model) -> list:
    """A list that grows by one on every forward of `model`'s base model."""
    calls = []
    model.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return Corpus(TEXTS, LABELS)


@pytest.fixture(scope="module")
def found(tok, corpus):
    """(model [2 layers x 48 neurons], scores, experts k=5) of the two-label corpus."""
    model = tiny_model("llama")
    scores = collect(model, tok, corpus, progress=False).score()
    return model, scores, select_experts(scores, k=5)


@pytest.fixture(scope="module")
def state(tok, corpus):
    return collect_stream(tiny_model("llama"), tok, corpus, **STREAM)


# --- training mode --------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["collect", "collect_stream", "refine", "embed"])
def test_training_mode_is_refused_before_any_forward(entry, tok, corpus, state):
    model = tiny_model("llama").train()  # as from_config returns it
    calls = forwards(model)
    run = {
        "collect": lambda: collect(model, tok, corpus, progress=False),
        "collect_stream": lambda: collect_stream(model, tok, corpus, **STREAM),
        "refine": lambda: refine(model, tok, corpus, state, k=3, progress=False),
        "embed": lambda: embed(model, tok, TEXTS, progress=False),
    }[entry]
    with pytest.raises(ValueError, match=TRAINING):
        run()
    assert not calls
    model.eval()
    run()
    assert calls  # the same call runs once the model is in eval mode


# --- k --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, message", [
    (-3, r"k=-3: must be an integer >= 1"),
    (0, r"k=0: must be an integer >= 1"),
    (2.5, r"k=2\.5: must be an integer >= 1"),
    (True, r"k=True: must be an integer >= 1"),
    (100000, r"k=100000 but the model has 96 neurons"),
])
def test_select_experts_refuses_bad_k(found, k, message):
    with pytest.raises(ValueError, match=message):
        select_experts(found[1], k=k)


def test_select_experts_refuses_bad_bottom_k_and_counts_a_layer_filter(found):
    scores = found[1]
    with pytest.raises(ValueError, match=r"bottom_k=-1: must be an integer >= 0"):
        select_experts(scores, k=2, bottom_k=-1)
    with pytest.raises(ValueError, match=r"k=50 but layers \[1\] hold 48 neurons"):
        select_experts(scores, k=50, layers=[1])
    assert len(select_experts(scores, k=96).experts["en"]["layer"]) == 96  # every neuron: allowed


def test_check_k_for_the_cli():
    assert check_k(5) == 5 and check_k(0, "bottom_k", allow_zero=True) == 0
    assert check_k(46080, available=46080) == 46080
    with pytest.raises(ValueError, match=r"^k=100000 but the model has 46,080 neurons$"):
        check_k(100000, available=46080)
    with pytest.raises(ValueError, match=r"^bottom_k=-5: must be an integer >= 0$"):
        check_k(-5, "bottom_k", allow_zero=True)
    with pytest.raises(ValueError, match=r"^k='3': must be an integer >= 1$"):
        check_k("3")


def test_fewer_eligible_neurons_warn_naming_the_label(found):
    scores = found[1]
    eligible = int((scores.stats["auroc"][scores.index("fr")] > 0.5).sum())
    assert 0 < eligible < 96
    with pytest.warns(UserWarning, match=rf"label 'fr': only {eligible} neurons have finite auroc and "
                                         rf"AUROC > 0\.5: {eligible} experts, not k=96"):
        experts = select_experts(scores, k=96, by="auroc", min_auroc=0.5, splits=["fr"])
    assert len(experts.experts["fr"]["layer"]) == eligible


@pytest.mark.parametrize("k, message", [
    (-3, r"k=-3: must be an integer >= 1"),
    (0, r"k=0: must be an integer >= 1"),
    (6, r"k=6 but the set holds 5 experts for 'fr'"),
])
def test_intervention_refuses_bad_k(found, k, message):
    with pytest.raises(ValueError, match=message):
        found[2].intervention("fr", k=k)
    assert len(found[2].intervention("fr", k=5)) == 5 and len(found[2].intervention("fr")) == 5


def test_random_control_and_the_sweep_refuse_bad_k_before_sampling(found, tok):
    model, _, experts = found
    with pytest.raises(ValueError, match=r"k=-1: must be an integer >= 0"):
        random_control(experts, "fr", -1, seed=0)
    with pytest.raises(ValueError, match=r"k=6 but the set holds 5 experts for 'fr'"):
        random_control(experts, "fr", 6, seed=0)
    with pytest.raises(ValueError, match=r"layers='all'; choose one of \('any', 'matched'\)"):
        random_control(experts, "fr", 2, seed=0, layers="all")
    assert len(random_control(experts, "fr", 0, seed=0)[0]) == 0  # k=0: no steering
    calls = forwards(model)
    common = dict(n_samples=2, max_new_tokens=2, heldout=None, random_seeds=(), log=None)
    with pytest.raises(ValueError, match=r"k=-3: must be an integer >= 0"):
        language_steering(model, tok, experts, ["fr"], [0, -3], **common)
    with pytest.raises(ValueError, match=r"k=50 but the set holds 5 experts for 'fr'"):
        language_steering(model, tok, experts, ["fr"], [0, 2, 50], **common)
    assert not calls


def test_refine_refuses_bad_k_before_any_forward(tok, corpus, state):
    model = tiny_model("llama")
    calls = forwards(model)
    with pytest.raises(ValueError, match=r"k=-5: must be an integer >= 1"):
        refine(model, tok, corpus, state, k=-5, progress=False)
    with pytest.raises(ValueError, match=r"bottom_k=-1: must be an integer >= 0"):
        refine(model, tok, corpus, state, k=3, bottom_k=-1, progress=False)
    assert not calls


# --- labels ---------------------------------------------------------------------------------

ONE_LABEL = r"the corpus has one label \('en'\): experts need at least two"


def test_single_label_corpus_is_refused_before_any_forward(tok, tmp_path):
    model = tiny_model("llama")
    calls = forwards(model)
    one = Corpus(TEXTS, ["en"] * len(TEXTS))
    with pytest.raises(ValueError, match=ONE_LABEL):
        collect(model, tok, one, progress=False)
    with pytest.raises(ValueError, match=ONE_LABEL):
        collect_stream(model, tok, one, **STREAM)
    path = tmp_path / "en.tsv"
    path.write_text("".join(f"en\t{t}\n" for t in TEXTS), encoding="utf-8")
    with pytest.raises(ValueError, match=ONE_LABEL):
        collect_stream(model, tok, open_corpus(path), **STREAM)
    with pytest.warns(UserWarning, match=r"labels \['fr'\] have no sentences"):
        empty_fr = Corpus(TEXTS, ["en"] * len(TEXTS), order=["en", "fr"])
    with pytest.raises(ValueError, match=ONE_LABEL):  # a declared label without sentences
        collect(model, tok, empty_fr, progress=False)
    assert not calls
    assert embed(model, tok, TEXTS[:2], progress=False).shape[0] == 2  # embed needs no labels


def test_scores_of_one_label_warn_naming_it_and_select_nothing():
    responses = Responses(torch.randn(6, 2, 4), torch.zeros(6, dtype=torch.long), ["en"],
                          [f"en/{i}" for i in range(6)], {"model": "m"})
    with pytest.warns(RuntimeWarning, match=r"^label 'en': no negative sentences; auroc, off_mean set to NaN"):
        scores = responses.score()
    with pytest.raises(ValueError, match=r"label 'en' has no negative sentences .*experts need at least two labels"):
        select_experts(scores, k=3)


def test_warnings_name_labels_not_split_indices():
    responses = Responses(torch.randn(6, 2, 4), torch.tensor([0, 0, 0, 1, 1, 1]), ["en", "fr", "de"],
                          [f"s{i}" for i in range(6)], {"model": "m"})
    with pytest.warns(RuntimeWarning, match=r"^label 'de': no positive sentences") as seen:
        responses.score()
    assert not [w for w in seen if "split " in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"^label 'fr': no positive sentences"):
        score_splits(torch.randn(4, 3), torch.tensor([0, 0, 2, 2]), [([0], None), ([1], None)], names=["en", "fr"])
    with pytest.raises(ValueError, match=r"^label 'en': a label is both positive and negative"):
        score_splits(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), [([0], [0, 1])], names=["en"])


# --- TSV columns ----------------------------------------------------------------------------

SENTENCES = [f"Sentence number {i} of the corpus." for i in range(121)]
LANGS = ["en", "fr", "de", "es"]


def test_swapped_tsv_columns_are_refused(tmp_path):
    path = tmp_path / "swapped.tsv"
    path.write_text("".join(f"{t}\t{LANGS[i % 4]}\n" for i, t in enumerate(SENTENCES)), encoding="utf-8")
    message = (r"swapped\.tsv: column 1 looks like text, not labels \(121 distinct labels in 121 rows, "
               r"e\.g\. 'Sentence number 0 of the corpus\.': is it text<TAB>label\?")
    with pytest.raises(ValueError, match=message):
        from_tsv(path)
    with pytest.raises(ValueError, match=message):
        open_corpus(path)
    small = tmp_path / "small.tsv"
    small.write_text("Hello there.\ten\nBonjour à tous.\tfr\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"small\.tsv: column 1 looks like text, not labels \(2 distinct labels in 2 rows"):
        from_tsv(small)


def test_a_header_names_the_columns(tmp_path):
    path = tmp_path / "text_first.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{LANGS[i % 4]}\n" for i, t in enumerate(SENTENCES)),
                    encoding="utf-8")
    c = from_tsv(path)
    assert c.label_names == LANGS and c.texts == SENTENCES and len(c) == 121
    streamed = open_corpus(path)
    assert streamed.label_names == LANGS and streamed.hash() == c.hash()
    header = tmp_path / "label_first.tsv"
    header.write_text("Label\tText\n" + "".join(f"{LANGS[i % 4]}\t{t}\n" for i, t in enumerate(SENTENCES)),
                      encoding="utf-8")
    assert from_tsv(header).hash() == c.hash()  # the header is skipped, not a label


def test_legitimate_many_label_corpora_still_load(tmp_path):
    # 30 labels interleaved sentence by sentence: most labels of the first rows differ, but the
    # sentences do too, so it is not swapped
    langs = [f"l{j}" for j in range(30)]
    path = tmp_path / "interleaved.tsv"
    path.write_text("".join(f"{langs[i % 30]}\tverse {i} in {langs[i % 30]}\n" for i in range(60)), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(from_tsv(path).label_names) == 30 and len(open_corpus(path)) == 60
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("en\tHello.\nfr\tBonjour.\n", encoding="utf-8")
    assert from_tsv(tiny).label_names == ["en", "fr"]
