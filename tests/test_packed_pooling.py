"""The vLLM worker's pooling (steer/vllm/pooling.py) without vLLM: requests' tokens packed into
one flat tensor per step as vLLM lays them out, chunked across steps, preempted and moved between
batch rows, against the reference pooling of each sentence on its own
(`kernels/fused_mlp_ref.py`: `pool`, `activation_stats`)."""
import pytest
import torch
from safetensors.torch import load_file

from steer.core.stream import StreamState
from steer.core.token_stats import PREFIX
from steer.kernels.fused_mlp_ref import ACTIVATIONS, activation_stats, pool
from steer.vllm.pooling import (Pooling, join_states, join_tables, join_token_stats, local_columns, pack_rows,
                                shard_path, shard_state, unpack_rows)
from steer.vllm.requests import Dims, collect_request

DIMS = Dims(layers=2, width=6, hidden=4)
LENGTHS = [5, 7, 3, 9]
SKIP = [{0}, {0}, set(), {0, 4}]
LABELS = [0, 1, 0, 1]


def sentences(seed=0):
    """Per sentence, per layer: h [T, W], gate_up [T, 2W], the stream's parts h, r [T, D]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        out.append({k: torch.randn(DIMS.layers, n, w, generator=g) for k, w in
                    (("h", DIMS.width), ("gate_up", 2 * DIMS.width), ("sh", DIMS.hidden), ("sr", DIMS.hidden))})
    return out


def schedule():
    """Steps of (batch row, request, computed tokens, tokens this step): chunked prefill, a request
    preempted and run again from its start (in another row), rows that move."""
    return [
        [(0, 0, 0, 3), (1, 1, 0, 4)],
        [(0, 0, 3, 2), (1, 1, 4, 2), (2, 3, 0, 4)],  # request 0 ends
        [(1, 3, 4, 3), (0, 1, 6, 1)],  # rows moved: 1 <-> 0 (request 1 ends)
        [(0, 2, 0, 3)],  # request 3 preempted (left the batch); request 2 whole
        [(1, 3, 0, 9)],  # request 3 runs again from its start, all of it
    ]


def run(pool_: Pooling, data, rank=0, world=1):
    """Feed the schedule through `pool_` as the plugin does (update_state, prepare, the ops, finish)."""
    requests = [(i, LABELS[i], frozenset(SKIP[i])) for i in range(len(LENGTHS))]
    rows: dict[int, int] = {}
    local = DIMS.width // world
    units = slice(rank * local, (rank + 1) * local)
    for step in schedule():
        now = {r: q for r, q, _, _ in step}
        for r in [r for r in rows if r not in now or rows[r] != now[r]]:
            pool_.remove(r)
            del rows[r]
        for r, q in now.items():
            if r not in rows:
                pool_.add(r, requests[q])
                rows[r] = q
        n = max(now) + 1
        qsl, computed, prompt = [0] * (n + 1), [0] * n, [0] * n
        flat = {k: [[] for _ in range(DIMS.layers)] for k in ("h", "gate_up", "sh", "sr")}
        for r in range(n):
            entry = [e for e in step if e[0] == r]
            count = entry[0][3] if entry else 0
            qsl[r + 1] = qsl[r] + count
            if entry:
                _, q, c, _ = entry[0]
                computed[r], prompt[r] = c, LENGTHS[q]
                for layer in range(DIMS.layers):
                    s = data[q]
                    flat["h"][layer].append(s["h"][layer, c:c + count, units])
                    gu = s["gate_up"][layer, c:c + count]
                    flat["gate_up"][layer].append(torch.cat([gu[:, :DIMS.width][:, units], gu[:, DIMS.width:][:, units]], 1))
                    flat["sh"][layer].append(s["sh"][layer, c:c + count])
                    flat["sr"][layer].append(s["sr"][layer, c:c + count])
        pool_.prepare(torch.tensor(qsl), torch.tensor(computed), torch.tensor(prompt))
        for layer in range(DIMS.layers):
            h = torch.cat(flat["h"][layer])
            pool_.neuron(h, torch.cat(flat["gate_up"][layer]), layer, "silu")
            pool_.residual(torch.cat(flat["sh"][layer]), torch.cat(flat["sr"][layer]), layer)
        pool_.finish()


def reference(data, how):
    """Each sentence pooled on its own: responses [N, L*W], and the token sums per label."""
    values, act_pos, act_sum, resid, tokens = [], torch.zeros(2, DIMS.layers, DIMS.width), \
        torch.zeros(2, DIMS.layers, DIMS.width), torch.zeros(2, DIMS.layers, DIMS.hidden), torch.zeros(2)
    for i, s in enumerate(data):
        mask = torch.tensor([[p not in SKIP[i] for p in range(LENGTHS[i])]])
        values.append(torch.stack([pool(s["h"][l][None], mask, how)[0] for l in range(DIMS.layers)]).flatten())
        for l in range(DIMS.layers):
            a = ACTIVATIONS["silu"](s["gate_up"][l, :, :DIMS.width])[None]
            pos, tot = activation_stats(a, mask)
            act_pos[LABELS[i], l] += pos[0]
            act_sum[LABELS[i], l] += tot[0]
            resid[LABELS[i], l] += (s["sh"][l] + s["sr"][l])[mask[0]].sum(0)
        tokens[LABELS[i]] += mask.sum()
    return torch.stack(values), {"act_pos": act_pos, "act_sum": act_sum, "resid_sum": resid, "tokens": tokens}


@pytest.mark.parametrize("how", ["max", "mean"])
def test_table_equals_each_sentence_pooled_alone(tmp_path, how):
    data = sentences()
    p = Pooling(DIMS, slots=2, device="cpu")  # fewer slots than requests in flight: it grows
    p.begin(how, ["a", "b"], ["activation", "residual"], rows=len(LENGTHS))
    run(p, data)
    p.save(str(tmp_path / "t.safetensors"))
    got = load_file(tmp_path / "t.safetensors")
    want, stats = reference(data, how)
    torch.testing.assert_close(got["values"], want, rtol=1e-6, atol=1e-6)
    for name, t in stats.items():
        torch.testing.assert_close(got[PREFIX + name].double(), t.double(), rtol=1e-5, atol=1e-5)


def test_refine_columns_and_tensor_parallel_shards(tmp_path):
    data = sentences(1)
    columns = [11, 0, 7, 5, 6]  # flat indices layer * width + unit, in refine's order
    whole = Pooling(DIMS, slots=4, device="cpu")
    whole.begin("max", ["a", "b"], ["activation"], rows=len(LENGTHS), columns=columns)
    run(whole, data)
    whole.save(str(tmp_path / "w"))
    want = reference(data, "max")[0][:, columns]
    torch.testing.assert_close(load_file(tmp_path / "w")["values"], want)
    for cols in (None, columns):  # two ranks, each its half of the units
        parts = []
        for rank in (0, 1):
            p = Pooling(DIMS, slots=4, device="cpu", rank=rank, world=2)
            p.begin("max", ["a", "b"], ["activation"], rows=len(LENGTHS), columns=cols)
            run(p, data, rank, 2)
            p.save(str(tmp_path / "s"))
            parts.append(load_file(shard_path(tmp_path / "s", rank, 2)))
        joined = join_tables([q["values"] for q in parts], DIMS.layers, DIMS.width, cols)
        full = reference(data, "max")[0]
        torch.testing.assert_close(joined, full if cols is None else full[:, cols])
        stats = join_token_stats(parts)
        torch.testing.assert_close(stats[PREFIX + "act_pos"], reference(data, "max")[1]["act_pos"].long())
    assert local_columns(columns, 6, 1, 2).tolist() == [1 * 3 + 2, 0 * 3 + 2]  # 11 -> layer 1 unit 5; 5 -> layer 0 unit 5


def test_stream_state_from_the_calibration_table_then_counted(tmp_path):
    data = sentences(2)
    settings = {"layers": DIMS.layers, "width": DIMS.width, "pooling": "max"}
    p = Pooling(DIMS, slots=4, device="cpu")
    p.begin("max", ["a", "b"], [], rows=len(LENGTHS))
    run(p, data)
    p.calibrate(bins=4, settings=settings)
    want = StreamState.from_sample(reference(data, "max")[0], torch.tensor(LABELS), 4, ["a", "b"], settings)
    p.begin("max", ["a", "b"], [], rows=len(LENGTHS), keep="stream", done=[0, 1, 2, 3])
    p.save(str(tmp_path / "state"), {"format": "x"})
    got, extra = StreamState.load(tmp_path / "state", with_extra=True)
    for name, t in want._tensors().items():
        torch.testing.assert_close(got._tensors()[name], t)
    assert unpack_rows(extra["done"]).tolist() == [True] * 4


def test_shard_and_join_states_round_trip():
    g = torch.Generator().manual_seed(3)
    settings = {"layers": 2, "width": 6, "hidden": 4, "token_stats": ["activation", "residual"]}
    state = StreamState(torch.sort(torch.randn(12, 3, generator=g), 1).values, ["a", "b"], settings)
    state.update(torch.randn(9, 12, generator=g), torch.tensor([0, 1] * 4 + [0]))
    state.token_stats.act_sum += torch.randn(2, 2, 6, generator=g).double()
    state.token_stats.resid_sum += 1.5
    parts = [shard_state(state, r, 2) for r in (0, 1)]
    assert parts[1].edges.shape == (6, 3) and parts[1].settings["width"] == 3
    torch.testing.assert_close(parts[1].edges, state.edges.view(2, 6, 3)[:, 3:].reshape(6, 3))
    back = join_states(parts)
    assert back.settings == state.settings
    for name, t in {**state._tensors()}.items():
        torch.testing.assert_close(back._tensors()[name], t)


def test_rows_pack_and_collect_requests():
    mask = torch.rand(1001) > 0.5
    assert torch.equal(unpack_rows(pack_rows(mask)), mask)
    assert collect_request({"steer_collect": [3, 1, [0]]}) == (3, 1, frozenset({0}))
    assert collect_request({"temperature": 1}) is None
    for bad in ([3, 1], [3, -1, []], [3, 1, [0.5]], "x"):
        with pytest.raises(ValueError, match="steer_collect"):
            collect_request({"steer_collect": bad})
    with pytest.raises(ValueError, match="cannot also steer"):
        collect_request({"steer_collect": [0, 0, []], "steer_label": "fr"})


def test_only_the_passes_operations_are_called():
    p = Pooling(DIMS, slots=2, device="cpu")
    with pytest.raises(ValueError, match="unknown operation '_grow'"):
        p.call("_grow", {})
    assert p.call("end", {}) == {}
