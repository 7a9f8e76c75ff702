"""One rule per forward pass (issue 34): collection, embeddings, generation and perplexity plan
their batches with the token budget (`batches`), tokenize with `tokenize`, pad with `padding`
and skip the special tokens the tokenizer adds (all of them, wherever they sit)."""
import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers import processors

import steer.engine.generation as G
from steer.core.adapters import NeuronLayout
from steer.core.corpus import Corpus
from steer.engine.batching import MAX_TOKENS, padding, tokenize
from steer.engine.collect import collect
from steer.engine.embed import embed
from tiny import VOCAB, tiny_model, tiny_tokenizer

LONG = 20_000


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(torch.nn.Module):
    """A stand-in causal LM that runs nothing: it records the real lengths of the rows of every
    batch it is given, and "generates" max_new_tokens copies of (row length % 250 + 3), so
    that a test can see which prompt each output came from."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[list[int]] = []

    @property
    def base_model(self):
        return self

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.batches.append(attention_mask.sum(1).tolist())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    def generate(self, input_ids, attention_mask, generation_config, **kw):
        lengths = attention_mask.sum(1)
        self.batches.append(lengths.tolist())
        new = (lengths % 250 + 3)[:, None].expand(-1, generation_config.max_new_tokens)
        return torch.cat([input_ids, new], 1)


def prompts_with_a_long_one():
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 60))) for _ in range(300)]
    prompts.insert(137, "x" * LONG)  # 20,001 tokens with BOS
    return prompts


def check_budget(batches, batch_size, new_tokens, lengths):
    assert batches[0] == [LONG + 1]  # alone, and first: a memory problem shows at once
    assert sorted(n for b in batches for n in b) == sorted(lengths)  # each prompt once
    for b in batches[1:]:
        assert 1 <= len(b) <= batch_size and len(b) * (max(b) + new_tokens) <= MAX_TOKENS
    assert max(len(b) for b in batches) == batch_size  # short prompts: bounded by the count


def test_generation_plans_a_20000_token_prompt_alone_and_the_rest_within_the_budget():
    prompts, tok, model = prompts_with_a_long_one(), tiny_tokenizer(), Recorder()
    lengths = [len(r) for r in G.encode_prompts(tok, prompts)]
    out = G.generate_ids(model, tok, prompts, max_new_tokens=500, batch_size=16)
    check_budget(model.batches, 16, 500, lengths)
    # the new tokens count: 16 prompts of up to 61 tokens fit 8,192 alone, not with 500 new each
    assert any(len(b) < 16 and 16 * max(b) <= MAX_TOKENS for b in model.batches[1:-1])
    assert out == [[n % 250 + 3] * 500 for n in lengths]  # in prompt order


def test_perplexity_plans_a_20000_token_text_alone_and_the_rest_within_the_budget():
    prompts, tok, model = prompts_with_a_long_one(), tiny_tokenizer(), Recorder()
    lengths = [len(r) for r in G.encode_prompts(tok, prompts)]
    result = G.perplexity(model, tok, prompts, batch_size=8)
    check_budget(model.batches, 8, 0, lengths)
    assert result["tokens"] == sum(lengths) - len(lengths)  # every token after BOS, padding never


# ---------------------------------------------------------------------------------------------
# the same text, the same tokens, padding and skipped positions in every pass

TEXTS = ["hello there", "le chat noir", "ab"]


def bos_and_eos_tokenizer():
    """The tiny tokenizer adding BOS and EOS: a rule skipping only the first token would pool EOS."""
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def by_hand(text):
    return [1, *(bos_and_eos_tokenizer().convert_tokens_to_ids(list(text))), 2]


def seen_inputs(model, call):
    """(input_ids, attention_mask) of the first forward of the base model under `call()`."""
    seen = []
    handle = model.base_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["input_ids"].clone(), kw["attention_mask"].clone())),
        with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_pass_reads_the_same_tokens_and_padding(side):
    model, tok = tiny_model("llama"), bos_and_eos_tokenizer()
    tok.padding_side = side
    rows = sorted((by_hand(t) for t in TEXTS), key=len, reverse=True)  # one batch, longest first
    width = len(rows[0])

    def padded(left):
        fill = [[0] * (width - len(r)) for r in rows]
        ids = [f + r if left else r + f for r, f in zip(rows, fill)]
        mask = [[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f) for r, f in zip(rows, fill)]
        return torch.tensor(ids), torch.tensor(mask)

    corpus = Corpus(TEXTS, ["a", "b", "a"])
    passes = {
        "collect": lambda: collect(model, tok, corpus, progress=False),
        "embed": lambda: embed(model, tok, TEXTS, progress=False),
        "perplexity": lambda: G.perplexity(model, tok, TEXTS),
        "generate": lambda: G.generate_ids(model, tok, TEXTS, max_new_tokens=1),
    }
    for name, call in passes.items():
        ids, mask = seen_inputs(model, call)
        want_ids, want_mask = padded(left=side == "left" or name == "generate")  # generation: left
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), name
    assert G.encode_prompts(tok, TEXTS) == [by_hand(t) for t in TEXTS]


def test_every_pass_skips_every_special_token():
    """BOS and EOS left out of collection's pooling, embeddings and perplexity's scored tokens;
    pooling EOS too (the first-token-only rule) gives other numbers."""
    model, tok = tiny_model("llama"), bos_and_eos_tokenizer()
    layout = NeuronLayout(model)
    responses = collect(model, tok, Corpus(TEXTS, ["a", "b", "a"]), pooling="mean", batch_size=2,
                        progress=False).values  # [N, L, M]
    embeddings = embed(model, tok, TEXTS, skip_bos=True, batch_size=2, progress=False)  # [N, D]
    nll, scored = 0.0, 0
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([by_hand(text)])
        neurons = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, l=l: neurons.__setitem__(l, layout.view(a[0], 1)[0]))
                 for l, m in enumerate(layout.modules)]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
        inner = slice(1, -1)  # neither BOS nor EOS
        want = torch.stack([neurons[l][inner].mean(0) for l in range(layout.n_layers)])
        torch.testing.assert_close(responses[i], want, rtol=1e-5, atol=1e-6)
        hidden = out.hidden_states[-1][0]
        torch.testing.assert_close(embeddings[i], hidden[inner].mean(0), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(embeddings[i], hidden[1:].mean(0), rtol=1e-3, atol=1e-4)  # EOS pooled
        logp = out.logits[0, :-2].log_softmax(-1)  # predicting tokens 1..T-2: not EOS
        nll -= float(logp.gather(1, ids[0, 1:-1, None]).sum())
        scored += ids.shape[1] - 2
    ppl = G.perplexity(model, tok, TEXTS, batch_size=2)
    assert ppl["tokens"] == scored and ppl["nll"] == pytest.approx(nll / scored, rel=1e-5)


def test_an_empty_text_is_the_start_token():
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tok([""])["input_ids"] == [[]]  # a tokenizer that adds nothing
    ids, pooled = tokenize(tok, ["", "ab"], skip_special=False)
    assert ids == [[1], [69, 70]] and pooled == [[True], [True, True]]
    assert G.encode_prompts(tok, [""]) == [[1]]
    with pytest.raises(ValueError, match="'#0' has no token left once its special tokens are skipped"):
        tokenize(tok, ["", "ab"])
    with pytest.raises(ValueError, match="has no token left"):
        embed(tiny_model("llama"), tok, ["", "ab"], skip_bos=True, progress=False)


def test_one_padding_rule():
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    assert padding(tok) == (0, "right") and padding(tok, generating=True) == (0, "left")
    tok.padding_side = "left"
    assert padding(tok) == (0, "left")
    tok.pad_token = "</s>"
    assert padding(tok) == (2, "left")
    assert padding(None) == (0, "right")  # token ids without a tokenizer
