"""Batches bounded by tokens (issue 17): one plan (`steer.engine.batching.batches`) for every batching.

A batch holds at most `batch_size` sentences and `max_tokens` padded tokens (sentences x the
longest one's length), longest first; a sentence over the budget runs alone. Results do not
depend on the plan (up to fp rounding); checkpoints record each window's number of batches so a
resume still skips whole windows without tokenizing them.
"""
import random

import pytest
import torch

from steer.engine.batching import MAX_TOKENS, batches, plan_batches
from steer.engine.collect import Progress, collect, collect_stream, refine
from steer.core.corpus import Corpus
from steer.engine.embed import embed
from tiny import tiny_model, tiny_tokenizer

LONG = 20_000


def padded(lengths, rows):
    return len(rows) * max(lengths[i] for i in rows)


def check_plan(lengths, plan, batch_size, max_tokens):
    assert sorted(i for rows in plan for i in rows) == list(range(len(lengths)))  # each sentence once
    for rows in plan:
        assert 1 <= len(rows) <= batch_size
        assert len(rows) == 1 or padded(lengths, rows) <= max_tokens  # within budget, or alone
        assert [lengths[i] for i in rows] == sorted((lengths[i] for i in rows), reverse=True)
    firsts = [lengths[rows[0]] for rows in plan]
    assert firsts == sorted(firsts, reverse=True)  # longest first
    assert [i for rows in plan for i in rows] == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def test_plan_of_one_20000_token_sentence_among_short_ones():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(500)]
    lengths.insert(137, LONG)
    plan = batches(lengths, 16, MAX_TOKENS)
    check_plan(lengths, plan, 16, MAX_TOKENS)
    assert plan[0] == [137]  # alone, and first: a memory problem shows at once
    assert all(137 not in rows for rows in plan[1:])
    assert all(padded(lengths, rows) <= MAX_TOKENS for rows in plan[1:])
    assert all(len(rows) == 16 for rows in plan[1:-1])  # short sentences: bounded by the count only
    # without a budget the long sentence pads 15 others to its length (the batch)
    old = batches(lengths, 16)
    assert len(old[0]) == 16 and padded(lengths, old[0]) == 16 * LONG


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size,max_tokens", [(16, 8192), (4, 50), (16, 100), (3, 1), (7, None)])
def test_every_batch_within_budget(seed, batch_size, max_tokens):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 5, 30, 31, 99, 400]) for _ in range(rng.randint(1, 120))]
    plan = batches(lengths, batch_size, max_tokens)
    check_plan(lengths, plan, batch_size, max_tokens if max_tokens is not None else float("inf"))
    if max_tokens is None:  # no budget: chunks of batch_size, as before
        assert [len(r) for r in plan[:-1]] == [batch_size] * (len(plan) - 1)


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        batches([3, 4], 16, 0)


def test_plan_batches_of_a_corpus_with_a_20000_token_sentence():
    """The stream plan (tokenized by the tiny character tokenizer): the long sentence (20,001
    tokens with BOS) alone, every other batch within the budget, the window's tokens reported."""
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 40))) for _ in range(99)]
    texts.insert(50, "x" * LONG)
    corpus = Corpus(texts, ["a", "b", "c"] * 33 + ["a"])
    seen = []
    plan = list(plan_batches(corpus.records(), tiny_tokenizer(), batch_size=16, max_tokens=MAX_TOKENS,
                             window=64, on_window=lambda *a: seen.append(a)))
    assert plan[0].rows == [50] and len(plan[0].ids[0]) == LONG + 1
    assert all(len(b.rows) * max(map(len, b.ids)) <= MAX_TOKENS for b in plan[1:])
    assert sorted(r for b in plan for r in b.rows) == list(range(100))
    assert [b.index for b in plan] == list(range(len(plan)))
    assert [s[:3] for s in seen] == [(0, 5, 64), (1, 3, 36)] and seen[0][4] == seen[1][4] == 0
    assert sum(s[3] for s in seen) == sum(b.tokens for b in plan)


def test_skip_with_a_budget_tokenizes_only_unknown_windows():
    texts = ["a" * n for n in [50, 3, 4, 60, 2, 9, 1, 70, 5, 6, 7, 8]]
    corpus = Corpus(texts, ["a", "b"] * 6)
    tok = tiny_tokenizer()
    kw = dict(batch_size=4, max_tokens=100, window=6)
    sizes = []
    full = list(plan_batches(corpus.records(), tok, **kw, on_window=lambda w, n, *_: sizes.append(n)))
    assert sizes == [3, 3]  # a budget binds: 3 batches per window, not ceil(6 / 4) = 2
    counting = Counting(tok)
    tail = list(plan_batches(corpus.records(), counting, **kw, skip=3, known=sizes[:1]))
    assert [b.rows for b in tail] == [b.rows for b in full[3:]] and counting.texts == 6  # window 0 not tokenized
    counting = Counting(tok)
    assert [b.rows for b in plan_batches(corpus.records(), counting, **kw, skip=3)] == [b.rows for b in full[3:]]
    assert counting.texts == 12  # unknown window sizes under a budget: tokenized to be planned


def test_progress_counts_tokens():
    lengths = [LONG + 1] + [10] * 30
    bar = Progress(len(lengths), "test", True)
    bar.window(0, 2, 16, LONG + 1 + 150, 0)  # half the sentences tokenized: the rest estimated
    assert bar.bar.total == LONG + 151 + round(15 * (LONG + 151) / 16)
    bar.window(1, 1, 15, 150, 0)
    assert bar.bar.total == LONG + 1 + 300 and bar.bar.unit == "tok"
    bar.update(1, LONG + 1)
    assert bar.bar.n / bar.bar.total > 0.98  # the long sentence's batch shows its share
    bar.close()


TEXTS = ["the cat sat on the mat", "a dog", "le chat est là, sur le tapis rouge", "un chien", "das ist gut",
         "ein Hund bellt laut in der Nacht", "the end", "fin", "ende gut alles gut", "hello world", "bonjour",
         "hallo", "x" * 90, "y" * 45]
LABELS = ["en", "en", "fr", "fr", "de", "de", "en", "fr", "de", "en", "fr", "de", "en", "fr"]


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_collect_does_not_depend_on_the_budget(backend):
    model, tok, corpus = tiny_model("llama"), tiny_tokenizer(), Corpus(TEXTS, LABELS)
    ref = collect(model, tok, corpus, batch_size=16, max_tokens=None, progress=False, backend=backend)
    tight = collect(model, tok, corpus, batch_size=16, max_tokens=40, progress=False, backend=backend)
    torch.testing.assert_close(tight.values, ref.values, rtol=1e-5, atol=1e-6)
    assert tight.settings["tokens"] == ref.settings["tokens"] == sum(len(t) + 1 for t in TEXTS)


def test_embed_does_not_depend_on_the_budget():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    ref = embed(model, tok, TEXTS, max_tokens=None, progress=False)
    torch.testing.assert_close(embed(model, tok, TEXTS, max_tokens=30, progress=False), ref, rtol=1e-5, atol=1e-6)


def test_stream_resume_with_a_budget(tmp_path):
    """A budget that binds: the checkpoint records each window's batches, a run stopped mid-way
    resumes to the uninterrupted state, and another budget is refused."""
    rng = random.Random(2)
    texts = ["".join(rng.choice("abmnxyz ") for _ in range(rng.choice([3, 5, 40, 80]))) + "." for _ in range(60)]
    corpus = Corpus(texts, ["a", "b", "c"] * 20)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = dict(bins=8, calibration=12, batch_size=6, max_tokens=120, window=16, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forward passes are bit-for-bit reproducible at one thread count
    try:
        _stream_resume(model, tok, corpus, kw, tmp_path)
    finally:
        torch.set_num_threads(threads)


class Counting:
    """A tokenizer that counts the texts it tokenizes."""

    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __call__(self, texts, **kw):
        self.texts += len(texts)
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _stream_resume(model, tok, corpus, kw, tmp_path):
    one = collect_stream(model, tok, corpus, **kw)
    ckpt = tmp_path / "c.safetensors"
    calls = []

    def crash(*_):
        calls.append(1)
        if len(calls) > 5 + 11:  # 5 calibration batches, then 11 of the rest (8 + 6 + 5 in 3 windows)
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        collect_stream(model, tok, corpus, checkpoint=ckpt, checkpoint_every=2, **kw)
    handle.remove()
    from steer.core.stream import StreamState

    _, extra = StreamState.load(ckpt, with_extra=True)
    assert extra["plan"]["max_tokens"] == 120 and extra["position"] == 10 and extra["windows"][:2] == [8, 6]
    counting = Counting(tok)
    resumed = collect_stream(model, counting, corpus, checkpoint=ckpt, checkpoint_every=2, resume=True, **kw)
    assert counting.texts == 32  # of the 48 after calibration: window 0 (batches 0-7) not tokenized
    for key in ("edges", "counts", "n"):
        assert torch.equal(getattr(resumed, key), getattr(one, key)), key
    torch.testing.assert_close(resumed.sums, one.sums, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="max_tokens: 120 in the checkpoint, 8192 now"):
        collect_stream(model, tok, corpus, checkpoint=ckpt, resume=True, **{**kw, "max_tokens": MAX_TOKENS})
    scores = refine(model, tok, corpus, one, k=3, batch_size=6, max_tokens=50, progress=False)
    again = refine(model, tok, corpus, one, k=3, batch_size=6, max_tokens=None, progress=False)
    torch.testing.assert_close(scores.stats["ap"], again.stats["ap"], rtol=1e-12, atol=1e-12, equal_nan=True)
