"""steer's vLLM plugin (steer/vllm/) against stock vLLM and steer's transformers path.

Needs vLLM (`make install-vllm`; `make test-vllm` runs this folder). Three engine processes, one
per module (engine_run.py runs every scenario in each): stock vLLM with general plugins off
(VLLM_PLUGINS=""), the plugin in eager mode, the plugin compiled (Inductor on the CPU), and a
fourth for the example of docs/vllm.md, a fifth vLLM's HTTP server as docs/vllm.md starts it; each start
costs 20-50 s here (2 cores, tiny model).
"""
import functools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

if not os.environ.get("STEER_VLLM_TESTS"):
    pytest.importorskip("vllm")

import steer  # noqa: E402
from conftest import run_docs_example  # noqa: E402
from engine_run import LONG, SHORT  # noqa: E402
from steer.kernels.fused_mlp_ref import ACTIVATIONS  # noqa: E402
from steer.vllm.requests import Dims, SteerRequest  # noqa: E402

HERE = Path(__file__).resolve().parent
DIMS = Dims(2, 96, 64)  # the tiny models' layers, MLP width, hidden width (conftest.py)
ACT = {"gemma3": "gelu_tanh", "llama": "silu"}


def _file(served, name):
    return {"steer_intervention": str(served / f"{name}.safetensors")}


def _engine(served, mode, plugins=True, basic=False):
    out = served / f"{mode}-{'plugin' if plugins else 'stock'}.json"
    env = dict(os.environ)
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    cmd = [sys.executable, str(HERE / "engine_run.py"), str(served / "model"), str(served / "experts"), str(out),
           "--other", str(served / "other"), "--mode", mode] + (["--basic"] if basic else [])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def stock(served):
    return _engine(served, "eager", plugins=False)


@pytest.fixture(scope="module")
def eager(served):
    return _engine(served, "eager")


@pytest.fixture(scope="module")
def compiled(served):
    return _engine(served, "compiled")


@pytest.fixture(scope="module")
def llama(served_llama):
    return _engine(served_llama, "eager", basic=True)


def test_unsteered_requests_equal_stock_vllm(stock, eager):
    """No request steered: the same tokens as vLLM without general plugins, and in eager mode
    the same logprobs bit for bit."""
    assert eager["plain"] == stock["plain"]
    assert eager["after_bad"] == stock["plain"]


def test_compiled_mode(stock, eager, compiled):
    """Compiled (Inductor on the CPU, traced once): unsteered greedy tokens equal stock vLLM's,
    steered ones the eager plugin's; logprobs within 1e-4 (stated in docs/vllm.md)."""
    assert [r["tokens"] for r in compiled["plain"]] == [r["tokens"] for r in stock["plain"]]
    for name in eager["alone"]:
        assert [r["tokens"] for r in compiled["alone"][name]] == [r["tokens"] for r in eager["alone"][name]], name
    diff = max(abs(a["first"][t] - b["first"][t]) for x, y in ((compiled["plain"], stock["plain"]),
                                                              (compiled["alone"]["all"], eager["alone"]["all"]))
               for a, b in zip(x, y) for t in a["first"] if t in b["first"])
    print(f"compiled vs eager: max first-step logprob difference {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_steered_neurons_hold_the_sets_values(request, family):
    """At every steered layer and position the neuron tensor holds the set's values exactly
    (value x strength, in fp32); up to the first steered layer every other neuron is the
    unsteered one, bit for bit (later layers see the steered residual stream)."""
    served = request.getfixturevalue("served" if family == "gemma3" else "served_llama")
    eager = request.getfixturevalue("eager" if family == "gemma3" else "llama")
    iv = SteerRequest(str(served / "experts"), "fr", strength=4.0).intervention(DIMS)
    first = int(iv.mask.any(1).nonzero()[0])
    for layer in range(2):
        steered = torch.tensor(eager["tensors"]["all"][str(layer)]["h"])
        plain = torch.tensor(eager["tensors"]["plain"][str(layer)]["h"])
        mask = iv.mask[layer]
        assert steered.shape == plain.shape and steered.shape[0] == len(SHORT[0]) + 1  # BOS + characters
        assert torch.equal(steered[:, mask], iv.add[layer][mask].expand(steered.shape[0], -1))
        if layer <= first:
            assert torch.equal(steered[:, ~mask], plain[:, ~mask])


@pytest.mark.parametrize("family", ["gemma3", "llama"])
@pytest.mark.parametrize("name", ["act_set", "lape"])
def test_activation_site_holds_the_values(request, family, name):
    """At the activation site the neuron tensor holds, at every steered unit, the overridden
    activation times `up`, act(gate) computed from vLLM's own gate_up (`h * mul + add` of act(gate),
    then x up, in fp32): bit for bit. Every unsteered unit keeps vLLM's fused act-and-mul value,
    up to the first steered layer bit for bit equal to the unsteered run."""
    served = request.getfixturevalue("served" if family == "gemma3" else "served_llama")
    eager = request.getfixturevalue("eager" if family == "gemma3" else "llama")
    iv = SteerRequest.parse(_file(served, name)).intervention(DIMS)
    assert iv.site == "activation" and len(iv) > 0
    first = int(iv.mask.any(1).nonzero()[0])
    for layer in range(2):
        got = eager["tensors"][name][str(layer)]
        h, gate_up = torch.tensor(got["h"]), torch.tensor(got["gate_up"])
        gate, up = gate_up[:, :96], gate_up[:, 96:]
        mask = iv.mask[layer]
        a = ACTIVATIONS[ACT[family]](gate[:, mask])
        assert torch.equal(h[:, mask], (a * iv.mul[layer][mask] + iv.add[layer][mask]) * up[:, mask])
        if layer <= first:
            assert torch.equal(h[:, ~mask], torch.tensor(eager["tensors"]["plain"][str(layer)]["h"])[:, ~mask])


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_split_activation_differs_from_the_fused_op_by_rounding_at_most(request, family):
    """The activation site computes act(gate) x up apart (vLLM fuses act-and-mul), at the steered
    pairs only. Measured on every unit of the unsteered run: the split form against vLLM's fused
    value (docs/vllm.md states the numbers)."""
    eager = request.getfixturevalue("eager" if family == "gemma3" else "llama")
    for layer in range(2):
        got = eager["tensors"]["plain"][str(layer)]
        h, gate_up = torch.tensor(got["h"]), torch.tensor(got["gate_up"])
        split = ACTIVATIONS[ACT[family]](gate_up[:, :96]) * gate_up[:, 96:]
        diff = float((split - h).abs().max())
        print(f"{family} layer {layer}: max |fused - split| = {diff:.2e} (max |h| {float(h.abs().max()):.2f})")
        assert diff <= 4 * torch.finfo(torch.float32).eps * max(1.0, float(h.abs().max()))


@pytest.mark.parametrize("family", ["gemma3", "llama"])
@pytest.mark.parametrize("name", ["resid_set", "diffmean"])
def test_residual_site_holds_the_values(request, family, name):
    """At the residual site the stream after each steered layer (h + r of the layer's output, as
    vLLM's next add-norm forms it) holds the intervention's values: a set unit its value, an added
    direction the unsteered stream plus it, bit for bit at the first steered layer; every other
    unit there keeps the unsteered stream's bits."""
    served = request.getfixturevalue("served" if family == "gemma3" else "served_llama")
    eager = request.getfixturevalue("eager" if family == "gemma3" else "llama")
    iv = SteerRequest.parse(_file(served, name)).intervention(DIMS)
    assert iv.site == "residual" and len(iv) > 0
    layer = int(iv.mask.any(1).nonzero()[0])
    got = torch.tensor(eager["tensors"][name][str(layer)]["stream"])
    plain = torch.tensor(eager["tensors"]["plain"][str(layer)]["stream"])
    mask = iv.mask[layer]
    assert torch.equal(got[:, mask], plain[:, mask] * iv.mul[layer][mask] + iv.add[layer][mask])
    assert torch.equal(got[:, ~mask], plain[:, ~mask])
    assert not torch.equal(got, plain)


@functools.lru_cache(maxsize=2)
def _load(folder):
    return steer.load_model(folder, dtype="float32", device="cpu")


def _transformers_first_logprobs(served, extra, prompt):
    """log_softmax of the first generated token's logits through steer's transformers path."""
    model, tok = _load(served / "model")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if extra is None:
            logits = model(ids).logits[0, -1]
        else:
            iv = SteerRequest.parse(extra).intervention(DIMS)
            with steer.intervene(model, iv):
                logits = model(ids).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("family, name", [
    ("gemma3", "all"), ("gemma3", "prompt"), ("gemma3", "last"), ("gemma3", "en_k3"), ("gemma3", "lape"),
    ("gemma3", "act_set"), ("gemma3", "diffmean"), ("gemma3", "resid_set"), ("gemma3", "resid_last"),
    ("llama", "all"), ("llama", "last"), ("llama", "lape"), ("llama", "act_set"), ("llama", "diffmean"),
    ("llama", "resid_set")])
def test_first_step_logprobs_equal_steers_transformers_path(request, family, name):
    """The first generated token's logprobs (top 5) equal steer's transformers path with the
    same set, k, strength and positions, or the same saved intervention (activation and residual
    sites), within 1e-5 (fp32; the unsteered vLLM-vs-transformers difference, measured beside
    it, is the floor). The long prompt is prefilled in 5 chunks: "last" steers only its last
    token, in the last chunk."""
    from engine_run import steer as config

    served = request.getfixturevalue("served" if family == "gemma3" else "served_llama")
    eager = request.getfixturevalue("eager" if family == "gemma3" else "llama")
    extra = {"all": config(str(served / "experts")), "prompt": config(str(served / "experts"), positions="prompt"),
             "last": config(str(served / "experts"), positions="last"),
             "en_k3": {**config(str(served / "experts"), label="en", strength=8.0), "steer_k": 3},
             "resid_last": {**_file(served, "resid_set"), "steer_positions": "last"},
             **{f: _file(served, f) for f in ("lape", "diffmean", "act_set", "resid_set")}}[name]
    floor = 0.0
    for i, prompt in enumerate(SHORT + [LONG]):
        for ex, got in ((None, eager["plain"][i]), (extra, eager["alone"][name][i])):
            want = _transformers_first_logprobs(served, ex, prompt)
            d = max(abs(lp - float(want[int(t)])) for t, lp in got["first"].items())
            if ex is None:
                floor = max(floor, d)
            else:
                assert d < 1e-5, (name, prompt[:12], d)
    assert floor < 1e-5
    assert eager["alone"][name] != eager["plain"]  # the steering changed something


def test_positions_differ_where_they_should(eager):
    """"generated" leaves the first step alone (its logits come from prompt tokens only)."""
    for plain, gen in zip(eager["plain"], eager["alone"]["generated"]):
        assert gen["first"] == plain["first"]
    assert eager["alone"]["generated"] != eager["plain"]


def test_mixed_batch_equals_each_request_alone(eager):
    """Several sets, positions and unsteered rows in one batch: each request's greedy tokens
    and logprobs equal that request run alone."""
    m = eager["mixed"]
    index = {p: i for i, p in enumerate(SHORT + [LONG])}
    for name, prompt, got in zip(m["names"], m["prompts"], m["results"]):
        alone = (eager["plain"] if name is None else eager["alone"][name])[index[prompt]]
        assert got["tokens"] == alone["tokens"], (name, prompt[:12])
        assert all(math.isclose(got["first"][t], alone["first"][t], abs_tol=1e-6) for t in alone["first"])


def test_prefix_cache_never_mixes_steered_and_unsteered(eager):
    """The same long prompt, steered then unsteered then steered then unsteered: each equals
    its own fresh run (the steered request's KV blocks are salted)."""
    steered, plain = eager["alone"]["all"][2], eager["plain"][2]
    assert steered["tokens"] != plain["tokens"]
    for got, want in zip(eager["prefix"], (steered, plain, steered, plain)):
        assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("name, words", [
    ("missing", "no expert set at /nonexistent"), ("shapes", "the served model has 2 x 96"),
    ("k", "steer_k"), ("label", "no experts for label 'xx'"), ("positions", "steer_positions='middle'"),
    ("strength", "steer_strength=inf"), ("key", "unknown key(s) ['steer_layers']"),
    ("file_missing", "no intervention file at /nonexistent"),
    ("file_shape", "residual-site intervention of 2 layers x 32 units; the served model has 2 x 64"),
    ("file_keys", "['steer_label'] go with steer_experts")])
def test_bad_requests_are_refused_and_the_engine_serves_on(eager, name, words):
    said = eager["bad"][name]
    assert said is not None and "steer: " in said and words in said, said
    assert eager["after_bad"] == eager["plain"]


def test_readme_example_runs(served, tmp_path):
    """The vLLM example of docs/vllm.md, as written, on the tiny model and its expert set."""
    out = run_docs_example("SamplingParams(", [('resolve("gemma-3-270m")', repr(str(served / "model"))),
                                               ('"runs/experts/experts"', repr(str(served / "experts"))),
                                               ('"steer_k": 100', '"steer_k": 5')], tmp_path)
    lines = out.strip().splitlines()[-2:]
    assert len(lines) == 2 and lines[0] != lines[1], out


def _http_commands(served, port):
    """The docs' server and `curl` lines, pointed at the tiny model and its expert set."""
    page = (HERE.parents[1] / "docs" / "vllm.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", page, flags=re.S) if "api_server" in b)
    serve, curl = [line for line in block.splitlines() if line.startswith(("python -m vllm", "curl"))]
    for old, new in (("~/.cache/steer/models/gemma-3-270m", str(served / "model")), ("8000", str(port)),
                     ("runs/experts/experts", str(served / "experts")), ('"steer_k": 100', '"steer_k": 5')):
        assert old in serve + curl, old
        serve, curl = serve.replace(old, new), curl.replace(old, new)
    return [sys.executable, *shlex.split(serve)[1:], "--max-model-len", "256"], curl


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """vLLM's OpenAI server as the docs start it, on the tiny model (its own process, the plugin loaded
    through vLLM's entry point); (base URL, the docs' curl command)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve, curl = _http_commands(served, port)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, open(log.name).read()[-3000:]
                time.sleep(1)
        else:
            raise AssertionError("the server did not answer in 600 s: " + open(log.name).read()[-3000:])
        yield url, curl
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _complete(url, xargs=None, prompt=SHORT[0]):
    """(HTTP status, JSON body) of a greedy completion with `xargs` as vllm_xargs."""
    body = {"model": "gemma-3-270m", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_server_steers_refuses_and_serves_on(server, served, eager):
    """Over HTTP (vLLM's OpenAI server, completions, `vllm_xargs`): an unsteered and a steered
    request give the offline engine's greedy tokens; a saved intervention steers too; the docs'
    curl command steers; a bad request is refused with HTTP 400 naming the problem, and the
    server answers the next request as before."""
    from engine_run import steer as config

    url, curl = server
    def text(result):  # the offline engine's text of its greedy tokens
        return result["text"]

    status, plain = _complete(url)
    assert status == 200 and plain["choices"][0]["text"] == text(eager["plain"][0])
    status, steered = _complete(url, config(str(served / "experts")))
    assert status == 200 and steered["choices"][0]["text"] == text(eager["alone"]["all"][0])
    assert steered["choices"][0]["text"] != plain["choices"][0]["text"]
    status, lape = _complete(url, _file(served, "lape"))
    assert status == 200 and lape["choices"][0]["text"] == text(eager["alone"]["lape"][0])
    docs = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout)
    assert docs["choices"][0]["text"] != _complete(url, prompt="The law")[1]["choices"][0]["text"]
    status, bad = _complete(url, {"steer_experts": str(served / "experts"), "steer_label": "xx"})
    assert status == 400 and "no experts for label 'xx'" in json.dumps(bad), bad
    status, again = _complete(url)
    assert status == 200 and again["choices"][0]["text"] == plain["choices"][0]["text"]


def test_importing_steer_imports_no_vllm():
    """vLLM loads the plugin through its entry points; steer itself never imports vLLM."""
    subprocess.run([sys.executable, "-c", "import sys, steer, steer.vllm.requests\nassert 'vllm' not in sys.modules"],
                   check=True)
