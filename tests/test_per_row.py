"""Per-row steering (`InterventionSets`): each row of a mixed batch as if it ran alone with its own set.

Oracles: every prompt / text / sentence run alone with its own single `Intervention` (or with none),
through the same public verbs; rows with no set against the same batch run with no steering at all
(bit for bit). float64 tiny models of every family, both backends, padding on either side.
"""
import pytest
import torch
from transformers import DynamicCache

import steer
from steer.core.adapters import base_inputs
from steer.core.intervention import POSITIONS, Intervention, InterventionSets
from steer.engine import steering
from steer.engine.steering import intervene
from steer.engine.batching import pad_batch
from steer.engine.generation import encode_prompts, generate_ids
from steer.engine.patch import patch
from tiny import FAMILIES, batch, tiny_model, tiny_tokenizer

DT = torch.float64
PROMPTS = ["hello there", "le chat noir est sur", "", "ab", "der Hund", "xyz uvw"]


def three_sets(model, positions=("all", "all", "all")):
    """Three different interventions (set, scale + shift, zero) on both layers."""
    a = Intervention.for_model(model, positions[0]).set(0, [1, 5, 9, 20], 6.0).set(1, [3, 7], -6.0)
    b = Intervention.for_model(model, positions[1]).scale(0, [2, 5, 11], 3.0).shift(1, [0, 7, 30], 2.5)
    c = Intervention.for_model(model, positions[2]).zero(0, list(range(0, 40, 3))).set(1, [1], 9.0)
    return a, b, c


# transformers' Gemma-2, BLOOM and XGLM attention give NaN logits (or fail) for left-padded
# float64 rows, steered or not (their masks' float64 minimum): those run in float32, where the
# oracles below are exact all the same (the same fp32 override on the same values)
FLOAT32 = {"gemma2", "bloom", "xglm"}


def dtype(family):
    return torch.float32 if family in FLOAT32 else DT


def tol(family):
    """Tolerance against a row run alone (another batch shape may round differently)."""
    return dict(rtol=1e-5, atol=1e-5) if family in FLOAT32 else dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["hooks", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_generates_row_for_row_what_each_set_generates(family, backend):
    """Oracle: the same batch generated with ONE intervention (today's path) for every row; a
    row of the mixed batch must equal that run's row for its own set (None: the unsteered run)."""
    model, tok = tiny_model(family, dtype(family)), tiny_tokenizer()
    a, b, c = three_sets(model)
    per_prompt = [a, None, b, a, c, None]
    kw = dict(max_new_tokens=5, min_new_tokens=5, batch_size=len(PROMPTS))
    with patch(model) if backend == "fused" else torch.no_grad():
        mixed = generate_ids(model, tok, PROMPTS, intervention=per_prompt, **kw)
        whole = {id(iv): generate_ids(model, tok, PROMPTS, intervention=iv, **kw) for iv in (a, b, c, None)}
    assert mixed == [whole[id(iv)][i] for i, iv in enumerate(per_prompt)]


@pytest.mark.parametrize("backend", ["hooks", "fused"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_mixed_batch_generates_what_each_prompt_generates_alone(family, backend):
    model, tok = tiny_model(family, dtype(family)), tiny_tokenizer()
    a, b, c = three_sets(model)
    per_prompt = [a, None, b, a, c, None]
    kw = dict(max_new_tokens=5, min_new_tokens=5, batch_size=len(PROMPTS))
    with patch(model) if backend == "fused" else torch.no_grad():
        mixed = generate_ids(model, tok, PROMPTS, intervention=per_prompt, **kw)
        alone = [generate_ids(model, tok, [p], intervention=iv, **kw)[0] for p, iv in zip(PROMPTS, per_prompt)]
    assert mixed == alone


@pytest.mark.parametrize("backend", ["hooks", "fused"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt2", "opt"])
def test_mixed_batch_embeddings_and_unsteered_rows_bit_identical(family, side, backend):
    model, tok = tiny_model(family, dtype(family)), tiny_tokenizer()
    tok.padding_side = side
    a, b, c = three_sets(model)
    per_text = [None, a, b, None, c, a]
    texts = [p or "." for p in PROMPTS]
    with patch(model) if backend == "fused" else torch.no_grad():
        mixed = steer.embed(model, tok, texts, intervention=per_text, layers="all", progress=False)
        plain = steer.embed(model, tok, texts, layers="all", progress=False)
        for i, (t, iv) in enumerate(zip(texts, per_text)):
            alone = steer.embed(model, tok, [t], intervention=iv, layers="all", progress=False)
            for layer in alone:
                torch.testing.assert_close(mixed[layer][i:i + 1], alone[layer], rtol=1e-5, atol=1e-6)  # fp32 means
    for layer in plain:
        for i in (0, 3):  # no set: the same batch as with no steering at all, bit for bit
            assert torch.equal(mixed[layer][i], plain[layer][i])
    assert not torch.allclose(mixed[max(mixed)][1], plain[max(plain)][1])  # the sets do steer


@pytest.mark.parametrize("kind", ["hooks", "fused"])
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3", "bloom", "xglm"])
def test_pooled_responses_per_row(family, kind):
    """What collection pools (max over real tokens) under per-row sets equals each row alone."""
    model = tiny_model(family, dtype(family))
    a, b, _ = three_sets(model)
    sets = InterventionSets.of([a, b])
    ids, mask = batch([5, 3, 4, 6], pad_left=True)
    assignment = [1, None, 0, 1]
    with torch.no_grad():
        backend, owned = steering.use(model, kind)
        try:
            def pooled(i, m, steering):
                out = backend.start_pooling(m.bool(), "max")
                with steering:
                    model.base_model(**base_inputs(model, i, m))
                backend.stop_pooling()
                return out

            mixed = pooled(ids, mask, intervene(model, sets, rows=sets.rows(assignment)))
            for r, s in enumerate(assignment):
                iv = None if s is None else [a, b][s]
                one = (ids[r:r + 1], mask[r:r + 1])
                alone = pooled(*one, intervene(model, iv) if iv is not None else torch.no_grad())
                torch.testing.assert_close(mixed[r:r + 1], alone, **tol(family))
        finally:
            if owned:
                backend.remove()


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_each_set_keeps_its_own_positions_in_generation(backend):
    """Sets with "all", "last", "prompt" and "generated" in one batch, decoding with a KV cache."""
    model, tok = tiny_model("llama", DT), tiny_tokenizer()
    ivs = [Intervention.for_model(model, p).set(0, [1, 5, 9], 5.0).set(1, [2], -5.0)
           for p in POSITIONS]
    per_prompt = ivs + [None, ivs[1]]
    kw = dict(max_new_tokens=4, min_new_tokens=4, batch_size=len(PROMPTS))
    with patch(model) if backend == "fused" else torch.no_grad():
        mixed = generate_ids(model, tok, PROMPTS, intervention=per_prompt, **kw)
        alone = [generate_ids(model, tok, [p], intervention=iv, **kw)[0]
                 for p, iv in zip(PROMPTS, per_prompt)]
    assert mixed == alone


@pytest.mark.parametrize("expand", [dict(num_beams=2, num_return_sequences=2), dict(num_beams=3)])
def test_rows_follow_returned_sequences_and_beams(expand):
    """model.generate expands each row (num_return_sequences, beams): the backend repeats the rows."""
    model, tok = tiny_model("qwen2", DT), tiny_tokenizer()
    a, b, _ = three_sets(model)
    sets = InterventionSets.of([a, b])
    prompts, assignment = PROMPTS[:3], [1, None, 0]
    ids, mask = pad_batch(encode_prompts(tok, prompts), 0, "left")
    kw = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, **expand)
    with torch.no_grad():
        with intervene(model, sets, rows=sets.rows(assignment)):
            mixed = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        n = mixed.shape[0] // len(prompts)
        for r, s in enumerate(assignment):
            one = pad_batch(encode_prompts(tok, [prompts[r]]), 0, "left")
            with intervene(model, [a, b][s]) if s is not None else torch.no_grad():
                alone = model.generate(input_ids=one[0], attention_mask=one[1], **kw)[:, one[0].shape[1]:]
            assert mixed[r * n:(r + 1) * n].tolist() == alone.tolist()


def test_compiled_fused_forward_never_recompiles_for_new_rows_or_set_contents():
    """fullgraph on the patched model: changing the rows, the sets' contents and their positions
    reuses the graphs (prefill, decode)."""
    torch._dynamo.reset()
    model, tok = tiny_model("llama", DT), tiny_tokenizer()
    a, b, c = three_sets(model)
    sets = InterventionSets.of([a, b], capacity=64)
    ids, mask = pad_batch(encode_prompts(tok, PROMPTS[:4]), 0, "left")
    compiles = []

    def counting(gm, inputs):
        compiles.append(gm)
        return gm.forward

    def step(i, m, pos, cache):
        return model(input_ids=i, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits

    def run(fn, rows, n=3):
        out, cache = [], DynamicCache(config=model.config)
        m, pos = mask, (mask.cumsum(1) - 1).clamp(min=0)
        with intervene(model, sets, rows=rows):
            logits = fn(ids, m, pos, cache)
            for _ in range(n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(nxt)
                m, pos = torch.cat([m, torch.ones_like(nxt)], 1), pos[:, -1:] + 1
                logits = fn(nxt, m, pos, cache)
        return torch.cat(out, 1).tolist()

    with patch(model), torch.no_grad():
        compiled = torch.compile(step, backend=counting, fullgraph=True, dynamic=True)
        first = sets.rows([0, 1, None, 0])
        assert run(compiled, first) == run(step, first)
        n_graphs = len(compiles)
        second = sets.rows([1, None, 0, 0])
        assert run(compiled, second) == run(step, second)
        sets.put(1, Intervention.for_model(model, "generated").copy_(c))  # new contents and positions
        sets.put(0, None)
        assert run(compiled, first) == run(step, first)
    assert len(compiles) == n_graphs <= 2


def test_sets_storage_tables_and_errors():
    model = tiny_model("gpt2")
    a, b, c = three_sets(model)
    assert InterventionSets.of([a, b, c]).capacity == len(a) + len(b) + len(c)  # the default: just enough
    sets = InterventionSets.of([a, b, c], capacity=len(a) + len(b) + 2 * len(c))
    assert len(sets) == len(a) + len(b) + len(c)
    for layer in range(2):  # each set's row of the dense table is that intervention's buffers
        mask, mul, add = sets.table(layer)
        for s, iv in enumerate([a, b, c]):
            assert torch.equal(mask[s], iv.mask[layer])
            assert torch.equal(mul[s][iv.mask[layer]], iv.mul[layer][iv.mask[layer]])
            assert torch.equal(add[s][iv.mask[layer]], iv.add[layer][iv.mask[layer]])
        assert not mask[3].any()  # the "no set" row
    sets.put(0, c)  # replace: the old entries are freed, the capacity still fits
    assert torch.equal(sets.table(0)[0][0], c.mask[0]) and len(sets) == len(b) + 2 * len(c)
    with pytest.raises(ValueError, match="capacity"):
        sets.put(1, Intervention.for_model(model).set(0, list(range(48)), 1.0).set(1, list(range(48)), 1.0))
    with pytest.raises(IndexError, match="set 3"):
        sets.put(3, a)
    with pytest.raises(IndexError, match="set index 5"):
        sets.rows([0, 5])
    with pytest.raises(ValueError, match="rows"):
        intervene(model, sets)  # sets without rows
    with pytest.raises(ValueError, match="2 interventions for 3 inputs"):
        steer.embed(model, tiny_tokenizer(), ["a", "b", "c"], intervention=[a, b], progress=False)
    # another capacity: the same tables and positions, room for more; never below what is held
    wider = sets.with_capacity(sets.capacity + 100)
    assert wider.capacity == sets.capacity + 100 and len(wider) == len(sets) and wider.sizes == sets.sizes
    assert torch.equal(wider.codes, sets.codes)
    for layer in range(2):
        assert all(torch.equal(x, y) for x, y in zip(wider.table(layer), sets.table(layer)))
    wider.put(1, Intervention.for_model(model).set(0, list(range(48)), 1.0))  # fits now
    with pytest.raises(ValueError, match="capacity 1 <"):
        sets.with_capacity(1)
    # storage grows with the forced neurons: 64 sets of k = 2,000 on Llama-3-8B's 32 x 14,336
    big = InterventionSets(32, 14336, sets=64, capacity=64 * 2000)
    nbytes = sum(t.numel() * t.element_size() for t in (big.layer, big.unit, big.set, big.mul, big.add, big.codes))
    assert nbytes < 5e6, nbytes
