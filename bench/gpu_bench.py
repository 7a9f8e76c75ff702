"""GPU benchmarks and checks in stages, each kept to a budget of seconds (what bench/gpu.sh runs).

Written for a lent GPU machine (one H100 or H200 for a few minutes, no network, at most 64 MiB
carried, so the packaged weights stay behind), and run on this CPU too: models are built from
Gemma-3-270M's config (bench/configs/) and from a 2-layer model with Llama-3-8B's MLP
(4096 x 14336), random weights, so that the MLP's share of the time is realistic; `--real` takes
Gemma-3-270M's real weights instead of its config (where the package is installed).

    python bench/gpu_bench.py STAGE --out DIR --budget SECONDS [--quick]   # what gpu.sh runs
    python bench/gpu_bench.py steering --device cpu --dtype float32 --real  # -> results/cpu_steering.md
    python bench/gpu_bench.py collection --device cpu --quick --dtype float32   # -> results/quick/

With --out, a stage writes DIR/gpu_<stage>.md and .csv, then the marker DIR/<stage>.done
(status=..., wall_s=..., GPU, versions); without it, results/<gpu|cpu>_<stage>.md as before.
Every result records the GPU (`torch.cuda.get_device_name`), torch / triton / transformers
versions and the stage's wall time (`stage_wall_s`, from the process's start). A stage keeps to
--budget by estimating each piece from what it has measured and skipping (with a row saying so)
what would not fit. --quick: tiny model, tiny sizes, on the CPU (Triton's interpreter): a dry run
of the script itself, not a measurement.

Stages:
- smoke: import steer, build each benchmark model on the device (one forward, finite logits),
  one fused op (Triton) against its reference.
- tests: pytest with real Triton on CUDA tensors: tests/test_fused_kernel.py and the device tests
  of tests/test_gpu_script.py (histogram update, patched models of several families vs their CPU
  reference, fused collection); --quick: a subset under the interpreter.
- collection: bare base-model forward (over collect's batches, and over collect_stream's) vs exact
  collection (reference hooks) vs fused collection (Triton op on CUDA) vs streaming (fused +
  histogram kernel) vs today's way (bench/todays_way.py: full LM, corpus order, hooks + host
  copies), ratios to the bare forward (`ratio_same_batches`: streaming vs the bare forward over
  its own batches).
- steering: unsteered vs fused vs hook steering (34 experts of layer 0 set at every position) in a
  forward (batch 8 x 128) and greedy generation of 32 tokens (batch 1 and 8, KV cache), eager on
  every model; compiled on one model (the 8B-shaped MLP; Gemma's config after it if time is
  left): the forward with torch.compile(dynamic=False) and generation with a static cache, which
  Hugging Face compiles (decode steps; prefill eager). Every compiled variant is checked against
  its eager output (`same_as_eager`); `compile_s` is its first call.
- per_row: bench/per_row.py's case on Gemma's config: 64 rows with K = 1, 8, 64 expert sets
  (`InterventionSets`, set i % K per row, 50 random neurons each) vs one Intervention vs
  unsteered, a forward (64 x 128 tokens) and greedy generation (16 new tokens, DynamicCache),
  patched model; eager with repeats fitted to the budget from a probe round, then compiled
  (`torch.compile(dynamic=True)`) only if its estimated compile time fits (else a skipped row).
- scoring: per-neuron AP/AUROC + statistics of 36,864 neurons x 8 labels (synthetic) with
  scikit-learn (today's way, extrapolated), steer on the CPU and on the GPU, histogram scores on
  the GPU; then end to end (collect + score, Gemma-3-270M's config, 2,000 sentences): today's way
  vs steer exact vs steer streaming.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()  # a stage's budget counts from here (imports included)

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if not torch.cuda.is_available():  # before any kernel module is imported (see tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers as T  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
import todays_way  # noqa: E402
from baselines import bare_forward, sorted_plan, stream_plan  # noqa: E402
from harness import RESULTS, Table, compare, environment, finish, write_results  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

from steer import Corpus, Intervention, collect_stream, intervene, load_model
from steer import collect, patch  # noqa: E402

T_IMPORTED = time.perf_counter()
CONFIGS = HERE / "configs"
STAGES = ("smoke", "tests", "collection", "steering", "per_row", "scoring")
GEMMA, LLAMA8B, SMALL = "gemma-3-270m config", "2 layers of Llama-3-8B MLP", "small Llama"


class Deadline:
    """A stage's budget: seconds left (minus a reserve for writing results), counted from T_START."""

    def __init__(self, seconds: float | None, reserve: float = 3.0, start: float = T_START):
        self.seconds, self.reserve, self.start = seconds, reserve, start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.reserve - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()


def plan_repeats(left: float, round_s: float, max_repeats: int) -> int:
    """Timed repeats that fit in `left` seconds after one warm-up round of `round_s` (0: none fit)."""
    if round_s <= 0 or left == float("inf"):
        return max_repeats
    return max(0, min(max_repeats, int(left / round_s) - 1))


def skipped(title: str, reason: str, **extra) -> Table:
    return Table(title, [{**extra, "status": f"skipped: {reason}"}])


class Tables(list):
    """A stage's tables; each one added is written at once (`sink`, set by main with --out), so a
    stage cut short by its timeout still leaves what it measured (marked PARTIAL, no marker)."""

    sink = None

    def append(self, table: Table) -> None:
        super().append(table)
        if Tables.sink is not None:
            Tables.sink(self)

    def __iadd__(self, tables):
        for t in tables:
            self.append(t)
        return self


# --------------------------------------------------------------------------------------------
# Models and data

def models(quick: bool, real: bool = False) -> dict:
    if quick:  # one small model: a dry run of the script itself
        return {SMALL: T.LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=1000)}
    gemma = T.Gemma3TextConfig(**json.loads((CONFIGS / "gemma-3-270m.json").read_text()))
    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gemma = {"gemma-3-270m (real weights)": "gemma-3-270m"} if real else {GEMMA: gemma}
    return {**gemma, LLAMA8B: llama}


def build(cfg, device, dtype):
    """A model from a config (random weights, seeded, made on the device) or a `load_model` name."""
    if isinstance(cfg, str):
        return load_model(cfg, device=device, dtype=dtype)[0].eval()
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def share_weights(model):
    """A copy of `model` whose parameters are the same tensors (modules, hooks and buffers are its own)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def corpus(n: int) -> Corpus:
    rng = random.Random(0)
    chars = "abcdefghijklmnopqrstuvwxyz     "
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(20, 80))) for _ in range(n)]
    return Corpus(texts, [f"l{i % 8}" for i in range(n)])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def close(a, b) -> bool:
    return bool(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.float().abs().max())))


# --------------------------------------------------------------------------------------------
# Stage 0: smoke

def stage_smoke(args, device, dtype, dl) -> list[Table]:
    from steer.kernels.fused_mlp import fused_mlp
    from steer.kernels.fused_mlp_ref import fused_mlp_ref

    import steer

    rows = [{"check": "imports (torch, transformers, steer)", "seconds": T_IMPORTED - T_START,
             "result": f"steer from {Path(steer.__file__).parent}"}]
    for name, cfg in models(args.quick).items():
        t0 = time.perf_counter()
        model = build(cfg, device, dtype)
        ids = torch.randint(3, 900, (2, 16), device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        sync(device)
        n = sum(p.numel() for p in model.parameters())
        ok = bool(torch.isfinite(logits).all())
        rows.append({"check": f"build {name} on {device}, one forward", "seconds": time.perf_counter() - t0,
                     "result": f"{n:,} parameters, {dtype}, logits {tuple(logits.shape)} finite: {ok}"})
        if not ok:
            raise RuntimeError(f"{name}: non-finite logits")
        del model, logits
        free(device)
    g = torch.Generator().manual_seed(0)
    B, T_, M = 4, 64, 2048
    up, gate = (torch.randn(B, T_, M, generator=g).to(device, dtype) for _ in range(2))
    override = (torch.rand(M, generator=g).lt(0.1).to(device), torch.zeros(M, device=device),
                torch.full((M,), 2.0, device=device))
    pool = torch.ones(B, T_, dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    got = fused_mlp(up, gate, act="gelu_tanh", override=override, pool_tokens=pool, act_stats=True, impl="triton")
    sync(device)
    first = time.perf_counter() - t0
    want = fused_mlp_ref(up, gate, act="gelu_tanh", override=override, pool_tokens=pool, act_stats=True)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
    ok = all(close(a, b) for a, b in zip(got, want))
    rows.append({"check": f"fused_mlp (Triton{', interpreter' if device.type == 'cpu' else ''}) [{B}, {T_}, {M}] "
                          f"{dtype} vs reference", "seconds": first,
                 "result": f"max abs difference {diff:.3g}: {'ok' if ok else 'MISMATCH'} (first call, JIT included)"})
    if not ok:
        raise RuntimeError("fused_mlp differs from its reference")
    return [Table("Smoke test", rows)]


# --------------------------------------------------------------------------------------------
# Stage 1: kernel tests

TEST_FILES = ["tests/test_gpu_script.py", "tests/test_fused_kernel.py"]  # the device tests first
# under the interpreter on a CPU (--quick): a subset that touches every kind of test
QUICK_TESTS = ("(test_override_pool_max_and_counts_exact and mixed) or (test_activations_fp32 and silu) or "
               "(test_low_precision and silu) or test_padding_side or test_strided or test_steer_last or "
               "test_opcheck or test_fake_implementation or (device and (histogram or llama or state))")


def junit(path: Path) -> list[dict]:
    """One row per test case of a pytest junit XML file: test, outcome, seconds, message."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        test = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        rows.append({"test": test, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    return rows


def verbose_outcomes(log: str) -> list[dict]:
    """Rows from `pytest -v` lines (for a run cut short, which writes no XML)."""
    rows = []
    for line in log.splitlines():
        for word, outcome in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "error"), ("SKIPPED", "skipped")):
            if f" {word}" in line and "::" in line:
                rows.append({"test": line.split(" ")[0].split("/")[-1], "outcome": outcome,
                             "seconds": float("nan"), "message": ""})
                break
    return rows


def stage_tests(args, device, dtype, dl) -> tuple[list[Table], str]:
    xml = Path(args.out or RESULTS / "quick") / "gpu_tests.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-W", "ignore::DeprecationWarning", *TEST_FILES]
    env = dict(os.environ)
    if args.quick:
        cmd += ["-k", QUICK_TESTS]
        env["STEER_DEVICE_TESTS"] = "1"  # the device tests on CPU tensors, under the interpreter
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    limit = max(5.0, dl.left())
    print("$", " ".join(cmd), f"(limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        log, cut = p.stdout + p.stderr, False
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        cut = True
    seconds = time.perf_counter() - t0
    print(log, flush=True)
    rows = junit(xml) if xml.exists() and not cut else verbose_outcomes(log)
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    summary = {"files": " ".join(TEST_FILES), "selection": QUICK_TESTS if args.quick else "all",
               "triton": "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled (CUDA)",
               **counts, "pytest_s": seconds, "cut_short": cut}
    bad = [r for r in rows if r["outcome"] in ("failed", "error")]
    slow = sorted((r for r in rows if r["seconds"] == r["seconds"]), key=lambda r: -r["seconds"])[:10]
    skips = {}
    for r in rows:
        if r["outcome"] == "skipped":
            skips[r["message"]] = skips.get(r["message"], 0) + 1
    tables = [Table("Kernel tests", [summary]),
              Table("Failures", bad or [{"test": "none"}]),
              Table("Skipped (reason: count)", [{"reason": k, "count": v} for k, v in skips.items()] or [{"reason": "none"}]),
              Table("Slowest tests", slow)]
    if cut:
        status = f"TIMEOUT: pytest cut at {limit:.0f} s after {counts['passed']} passed, {len(bad)} failed"
    elif bad or counts["passed"] == 0:
        status = f"FAILED: {len(bad)} failed, {counts['passed']} passed, {counts['skipped']} skipped"
    else:
        status = f"ok: {counts['passed']} passed, {counts['skipped']} skipped"
    return tables, status


# --------------------------------------------------------------------------------------------
# Stage 2: collection

ROUND_FACTOR = 11  # one round of the seven variants, in bare forwards (today's way ~4, the rest ~1-1.2)


def stage_collection(args, device, dtype, dl) -> list[Table]:
    tok = tiny_tokenizer()
    n_full = args.n or (64 if args.quick else 2000)
    items = list(models(args.quick, args.real).items())
    tables = Tables()
    for k, (name, cfg) in enumerate(items):
        title = f"Collection on {name}"
        share = dl.left() / (len(items) - k)
        model = build(cfg, device, dtype)
        data = corpus(n_full)

        def bare(d):
            return bare_forward(model, tok, sorted_plan(tok, d), lambda: sync(device))

        timed(bare(corpus(16)))  # first call costs (cuBLAS, caches)
        probe = corpus(min(len(data), 256))
        bare_s = timed(bare(probe)) * len(data) / len(probe)  # a bare forward over the data, estimated
        jit = 5.0 if device.type == "cuda" else 0.0  # Triton's first compiles, in the warm-up round
        round_s = ROUND_FACTOR * bare_s
        repeats = plan_repeats(share - jit, round_s, 2 if args.quick else args.repeats)
        if repeats < 2 and not args.quick:  # rather 2 repeats on >= 500 sentences, or 1 on >= 250
            for want, least in ((2, 500), (1, 250)):
                n = min(len(data), int(len(data) * (share - jit) / ((want + 1) * round_s)))
                if n >= least and want > repeats:
                    data, repeats = corpus(n), want
                    break
        if repeats == 0:
            tables.append(skipped(title, f"budget ({share:.0f} s for this model; a round of {len(data)} "
                                         f"sentences takes ~{round_s:.0f} s)", model=name))
            model = None
            free(device)
            continue
        kw = dict(batch_size=16, progress=False)
        cal = min(256, len(data) // 4)  # a calibration sample, then streaming updates of the rest
        variants = {
            "bare forward": bare(data),
            "bare forward, stream's batches": bare_forward(model, tok, stream_plan(tok, data, cal), lambda: sync(device)),
            "exact, hooks": lambda: collect(model, tok, data, backend="hooks", **kw),
            "exact, fused": lambda: collect(model, tok, data, backend="fused", **kw),
            "stream, hooks": lambda: collect_stream(model, tok, data, backend="hooks", calibration=cal, **kw),
            "stream, fused": lambda: collect_stream(model, tok, data, backend="fused", calibration=cal, **kw),
            "today's way": lambda: todays_way.collect(model, tok, data.texts)[1],  # its timing breakdown
        }
        result = compare(variants, baseline="bare forward", repeats=repeats)
        same = result.variants["bare forward, stream's batches"].min
        rows = [{**r, "ratio_same_batches": r["min_s"] / same if r["variant"].startswith("stream") else ""}
                for r in result.rows(model=name, sentences=len(data))]
        tables.append(Table(f"{title} ({len(data)} sentences, {repeats} repeat(s))", rows))
        model = variants = result = None  # freed before the next model
        free(device)
    return tables


# --------------------------------------------------------------------------------------------
# Stage 3: steering overhead

def _set_recompile_limits(n: int = 64) -> None:
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, n)


class Steered:
    """One model three ways, sharing weights: unsteered, fused steering (patched), hook steering."""

    def __init__(self, name, cfg, device, dtype, quick):
        self.name, self.device = name, device
        plain = build(cfg, device, dtype)
        hooked, fused = share_weights(plain), share_weights(plain)
        patch(fused)
        for m in (hooked, fused):
            intervene(m, Intervention.for_model(m).set(0, list(range(0, 100, 3)), 2.0))
        self.models = {"unsteered": plain, "fused": fused, "hooks": hooked}
        self.layers = plain.config.num_hidden_layers
        self.ids = torch.randint(3, 900, (8, 32 if quick else 128), device=device)

    def logits(self, model, ids):
        with torch.inference_mode():
            return model(input_ids=ids).logits.float()

    def forward(self, model, batch):
        with torch.inference_mode():
            model(input_ids=self.ids[:batch])
        sync(self.device)

    def generate(self, model, batch, static=False, compile_config=None, check=False):
        prompt = self.ids[:batch, :16]
        kw = {}
        if static:
            kw["cache_implementation"] = "static"
            if compile_config is None:
                kw["disable_compile"] = True
            else:
                kw["compile_config"] = compile_config
        if check:
            kw.update(return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                 min_new_tokens=32, do_sample=False, pad_token_id=0, **kw)
        sync(self.device)
        return out


def _agree(a, b) -> tuple[bool, float]:
    """Greedy outputs (sequences, per-step logits) of two runs: logits close up to the first step
    where the tokens differ, and the fraction of equal new tokens."""
    seq_a, seq_b = a.sequences[:, -32:], b.sequences[:, -32:]
    same = (seq_a == seq_b).all(0)  # [32] every row equal at this step
    steps = int(same.int().cumprod(0).sum())
    ok = all(close(x, y) for x, y in zip(a.logits[:steps + 1], b.logits[:steps + 1]))
    return ok, float((seq_a == seq_b).float().mean())


def _eager(sm: Steered, args, dl, share, tables: Tables) -> None:
    for label, run, batch in [("forward, batch 8", sm.forward, 8), ("generate 32, batch 1", sm.generate, 1),
                              ("generate 32, batch 8", sm.generate, 8)]:
        title = f"Steering overhead, eager: {label} on {sm.name}"
        one = timed(lambda: run(sm.models["unsteered"], batch))
        repeats = plan_repeats(share / 3, 3.3 * one, 1 if args.quick else args.repeats + 2)
        if repeats == 0:
            tables.append(skipped(title, f"budget ({share / 3:.0f} s; one call {one:.2f} s)", model=sm.name))
            continue
        variants = {k: (lambda m=m: run(m, batch)) for k, m in sm.models.items()}
        result = compare(variants, baseline="unsteered", repeats=repeats)
        tables.append(Table(title, result.rows(model=sm.name, case=label, compiled=False)))


def _compiled(sm: Steered, args, dl, estimate: float, backend: str, tables: Tables) -> float:
    """Static-cache generation (batch 1), the forward (batch 8), then generation at batch 8, each
    with the three variants compiled; a group is skipped when its estimated cost (first `estimate`,
    then what the last group took) does not fit. Returns the largest group cost."""
    from transformers import CompileConfig

    cost = 0.0
    groups = [("generate 32 (static cache), batch 1", 1, True), ("forward, batch 8", 8, False)]
    if not args.quick:
        groups.append(("generate 32 (static cache), batch 8", 8, True))
    for label, batch, gen in groups:
        title = f"Steering overhead, compiled: {label} on {sm.name}"
        need = (cost or estimate) + 3
        if not dl.fits(need):
            tables.append(skipped(title, f"budget (~{need:.0f} s for 3 variants' compiles and timing, "
                                         f"{dl.left():.0f} s left)", model=sm.name))
            continue
        t_group = time.perf_counter()
        torch._dynamo.reset()
        originals = {k: m.forward for k, m in sm.models.items()}
        rows, compile_s, same, agree = [], {}, {}, {}
        try:
            if gen:
                cc = CompileConfig(fullgraph=False, dynamic=False, backend=backend,
                                   mode="default" if backend == "inductor" else None)
                if sm.device.type != "cuda":
                    cc._compile_all_devices = True  # the dry run compiles on the CPU
                variants = {k: (lambda m=m: sm.generate(m, batch, static=True, compile_config=cc))
                            for k, m in sm.models.items()}
                eager = {k: sm.generate(m, batch, static=True, check=True) for k, m in sm.models.items()}
            else:
                eager = {k: sm.logits(m, sm.ids[:batch]) for k, m in sm.models.items()}
                for m in sm.models.values():
                    m.forward = torch.compile(m.forward, dynamic=False, backend=backend)
                variants = {k: (lambda m=m: sm.forward(m, batch)) for k, m in sm.models.items()}
            for k, fn in variants.items():  # the first call compiles
                compile_s[k] = timed(fn)
            one = max(timed(fn) for fn in variants.values())
            # timed calls: at most ~10 s a group (or a third of what is left), compiles being the warm-up
            repeats = 1 if args.quick else plan_repeats(min(10.0, dl.left() / 3), 3.3 * one, args.repeats + 2) + 1
            result = compare(variants, baseline="unsteered", repeats=max(1, repeats), warmup=0)
            for k, m in sm.models.items():
                if gen:
                    same[k], agree[k] = _agree(sm.generate(m, batch, static=True, compile_config=cc, check=True), eager[k])
                else:
                    same[k] = close(sm.logits(m, sm.ids[:batch]), eager[k])
            rows = [{**r, "compile_s": compile_s[r["variant"]], "same_as_eager": same[r["variant"]],
                     **({"same_tokens_as_eager": agree[r["variant"]]} if gen else {})}
                    for r in result.rows(model=sm.name, case=label, compiled=backend)]
        except Exception as e:  # a compile failure is a result to report, not a crash
            rows.append({"model": sm.name, "case": label, "compiled": backend, "variant": "all",
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            for k, m in sm.models.items():
                m.forward = originals[k]
                m.__dict__.pop("_compiled_call", None)
        cost = max(cost, time.perf_counter() - t_group)
        tables.append(Table(title, rows))
    return cost


def stage_steering(args, device, dtype, dl) -> list[Table]:
    """Eager on every model, then compiled on the 8B-shaped MLP (few layers: quick compiles), then
    on Gemma's config if the budget allows (estimated from the compile times seen, per layer)."""
    _set_recompile_limits()
    backend = "eager" if device.type != "cuda" else "inductor"  # the dry run checks the plumbing only
    items = models(args.quick, args.real)
    built = {}
    tables = Tables()
    for k, (name, cfg) in enumerate(items.items()):  # eager: a third of the budget, shared by the models
        built[name] = sm = Steered(name, cfg, device, dtype, args.quick)
        for v in ("fused", "hooks"):  # else same_as_eager below could not tell steered from unsteered
            if close(sm.logits(sm.models[v], sm.ids[:, :16]), sm.logits(sm.models["unsteered"], sm.ids[:, :16])):
                raise RuntimeError(f"{v} steering does not change the logits beyond the check's tolerance")
        share = (dl.left() * 0.35) / (len(items) - k) if not args.quick else float("inf")
        _eager(sm, args, dl, share, tables)
    order = sorted(built, key=lambda n: built[n].layers)  # fewest layers first
    per_layer = None
    for name in order:
        sm = built[name]
        # a group's first cost: ~12 s a variant (inductor, cold; the hook variant graph-breaks at
        # every layer), then scaled by layers from the model before
        estimate = 36.0 if per_layer is None else per_layer * sm.layers
        cost = _compiled(sm, args, dl, estimate, backend, tables)
        if cost:
            per_layer = max(per_layer or 0.0, cost / sm.layers)
    return tables


# --------------------------------------------------------------------------------------------
# Stage 3b: per-row steering (bench/per_row.py)

PER_ROW_GRAPHS = 9  # compiled: 3 steering kinds (none, one Intervention, sets) x (forward, prefill, decode)


def stage_per_row(args, device, dtype, dl) -> list[Table]:
    """bench/per_row.py's case on Gemma's config (the steering stage's model): 64 rows with K = 1, 8,
    64 expert sets (`InterventionSets`, a set per row) vs one Intervention vs unsteered, a forward
    and greedy generation, patched model. Eager first: a probe pass (1 warm-up + 1 timed round)
    that times a round, then repeats fitted to the time left; compiled (`torch.compile(dynamic=True)`,
    Inductor; the dry run: the `eager` backend) after it only if its estimated cost fits."""
    import per_row

    tables = Tables()
    name, cfg = next(iter(models(args.quick, args.real).items()))
    tokens, new_tokens, k = (8, 3, 5) if args.quick else (128, 16, 50)
    model = build(cfg, device, dtype)
    layers = model.config.get_text_config().num_hidden_layers
    kw = dict(tokens=tokens, new_tokens=new_tokens, k=k)
    backend = "inductor" if device.type == "cuda" else "eager"  # the dry run checks the plumbing only

    def titled(ts, note):
        for t in ts:
            rows = [{"model": name, **r} for r in t.rows]
            tables.append(Table(f"Per-row steering on {name}, {t.title}", rows, note=note))

    note = ("ratio_* to 'single' (one Intervention for every row); vs_unsteered: median / the unsteered median. "
            "K=n: an InterventionSets of n sets, row i takes set i % n.")
    t0 = time.perf_counter()
    probe = per_row.measure(model, repeats=1, warmup=1, compiled=False, **kw)  # Triton JIT, cuBLAS: the warm-up
    probe_s = time.perf_counter() - t0
    round_s = sum(r["median_s"] for t in probe for r in t.rows)  # one round: every variant, both modes
    print(f"per_row: probe {probe_s:.1f} s, a round {round_s:.2f} s, {dl.left():.0f} s left", flush=True)
    repeats = 1 if args.quick else plan_repeats(dl.left() * 0.8, round_s, 3 * args.repeats)  # rounds are short
    if repeats <= 1:  # the probe's round is the measurement
        more = "" if args.quick else f" One repeat (the probe): more did not fit (a round {round_s:.1f} s)."
        titled(probe, note + more)
    else:
        titled(per_row.measure(model, repeats=repeats, warmup=1, compiled=False, **kw), note)

    # compiled: its compiles (in the warm-up round) are estimated, not measured, so rather skipped than cut
    title = f"Per-row steering on {name}, compiled (torch.compile(dynamic=True), {backend})"
    compile_est = PER_ROW_GRAPHS * (5.0 if device.type != "cuda" else 5.0 + 1.0 * layers)  # CPU: 40 s seen
    c_repeats = 1 if args.quick else max(1, min(repeats, plan_repeats(dl.left() - compile_est, round_s,
                                                                      3 * args.repeats)))
    need = compile_est + (1 + c_repeats) * round_s
    if not dl.fits(need):
        tables.append(skipped(title, f"budget (~{need:.0f} s: ~{compile_est:.0f} s of compiles estimated for "
                                     f"{PER_ROW_GRAPHS} graphs of {layers} layers, then {1 + c_repeats} rounds of "
                                     f"~{round_s:.1f} s; {dl.left():.0f} s left after eager; a longer limit, e.g. "
                                     f"GPU_SH_LIMITS=per_row={int(need * 1.3 + 60)}, runs it)", model=name))
        return tables
    _set_recompile_limits()
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        result = per_row.measure(model, repeats=c_repeats, warmup=1, compiled=True, eager=False, backend=backend,
                                 **kw)
    except Exception as e:  # a compile failure is a result to report, not a crash
        tables.append(Table(title, [{"model": name, "variant": "all",
                                     "error": f"{type(e).__name__}: {str(e)[:300]}"}]))
        return tables
    titled(result, note + f" torch.compile backend {backend}; compiles in the warm-up round: the compiled "
                          f"pass took {time.perf_counter() - t0:.0f} s in all (estimated {need:.0f} s).")
    return tables


# --------------------------------------------------------------------------------------------
# Stage 4: scoring and end to end

def stage_scoring(args, device, dtype, dl) -> list[Table]:
    """End to end first (the target), then scoring alone on synthetic responses."""
    from run import extrapolate, histogram_state, subset, synthetic

    from steer import score_state
    from steer.core.scores import shortlist_scores
    from steer.core.metrics import score_splits

    tables = Tables()
    on_gpu = device.type == "cuda"
    sk_neurons = 64 if args.quick else 128  # scikit-learn is timed on these and extrapolated

    # end to end: collect + score every neuron, 8 labels
    title = "End to end: collect + score every neuron, 8 labels one-vs-rest"
    name, cfg = next(iter(models(args.quick, args.real).items()))
    n = 64 if args.quick else 2000
    model, tok = build(cfg, device, dtype), tiny_tokenizer()
    data = corpus(n)
    units = subset(model.config.num_hidden_layers * model.config.intermediate_size, sk_neurons)
    kw = dict(batch_size=16, progress=False)
    all_splits = [([i], None) for i in range(len(data.label_names))]  # one-vs-rest, as Responses.score

    def today():
        t0 = time.perf_counter()
        r, timing = todays_way.collect(model, tok, data.texts)
        t1 = time.perf_counter()
        _, st = todays_way.score(r, data.label_ids.numpy(), data.label_names, units=units)
        score_s, note = extrapolate(st)
        return {"collect_s": t1 - t0, "score_s": score_s, "score_measured_s": st["score_s"],
                "seconds": t1 - t0 + score_s, "note": note}

    def exact(on_device):
        def run():
            t0 = time.perf_counter()
            r = collect(model, tok, data, backend="fused", **kw)
            t1 = time.perf_counter()
            if on_device:  # what Responses.score computes, on the device
                score_splits(r.values.reshape(len(data), -1).to(device), r.label_ids.to(device), all_splits)
                sync(device)
            else:
                r.score()
            return {"collect_s": t1 - t0, "score_s": time.perf_counter() - t1}
        return run

    def stream():
        t0 = time.perf_counter()
        st = collect_stream(model, tok, data, backend="fused", calibration=min(1000, n // 2), **kw)
        t1 = time.perf_counter()
        score_state(st)
        return {"collect_s": t1 - t0, "score_s": time.perf_counter() - t1}

    small = corpus(32)
    t0 = time.perf_counter()  # first calls (Triton JIT, cuBLAS), and an estimate of one round
    collect(model, tok, small, backend="fused", **kw).score()
    score_state(collect_stream(model, tok, small, backend="fused", calibration=16, **kw))
    todays_way.collect(model, tok, small.texts)
    estimate = (time.perf_counter() - t0) * n / 32 * 0.5 + 10.0  # a round at N, + scikit-learn's part
    variants = {"today's way (collect + scikit-learn)": today,
                "steer exact (collect fused + Responses.score on the CPU)": exact(False),
                **({f"steer exact (collect fused + score_splits on {device})": exact(True)} if on_gpu else {}),
                "steer stream (collect_stream fused + score_state)": stream}
    if dl.fits(estimate):
        result = compare(variants, baseline=next(iter(variants)), repeats=1, warmup=0)
        tables.append(Table(f"{title}: {name}, {n} sentences", result.rows(model=name, N=n),
                            note="ratio = variant seconds / today's way seconds (below 1: faster; speed-up = "
                                 "1 / ratio). Today's way's scikit-learn part is EXTRAPOLATED from the first "
                                 "neurons of layer 0 (score_measured_s: what was measured)."))
    else:
        tables.append(skipped(title, f"budget (~{estimate:.0f} s, {dl.left():.0f} s left)", model=name))
    model = variants = None
    free(device)

    # scoring alone: synthetic responses, 36,864 neurons (Gemma-3-270M's), then Llama-3-8B's 458,752
    n = 200 if args.quick else 2000
    for layers, width in [(2, 256)] if args.quick else [(18, 2048), (32, 14336)]:
        m = layers * width
        title = f"Scoring, N = {n}, {m:,} neurons ({layers} x {width}), 8 labels one-vs-rest"
        big = m > 100_000
        if not dl.fits(12.0 if big else 10.0):
            tables.append(skipped(title, f"budget ({dl.left():.0f} s left)"))
            continue
        x, label_ids = synthetic(n, layers, width)
        names = [f"c{i}" for i in range(8)]
        splits = [([i], None) for i in range(8)]
        resp = {l: x.numpy()[:, l * width:(l + 1) * width] for l in range(layers)}
        units = subset(m, sk_neurons)
        xd, ld = x.to(device), label_ids.to(device)
        state = histogram_state(xd, ld, names, layers, width)  # on the device (histogram kernel), not timed

        def sk():
            _, st = todays_way.score(resp, label_ids.numpy(), names, auroc=True, units=units)
            seconds, note = extrapolate(st)
            return {"seconds": seconds, "score_measured_s": st["score_s"], "note": note}

        def on(dev_x, dev_l):
            def run():
                score_splits(dev_x, dev_l, splits)
                sync(device)
            return run

        def refined():
            keep, _ = shortlist_scores(score_state(state), k=100)
            score_splits(xd[:, keep.to(device)], ld, splits)
            sync(device)
            return {"note": f"short-list of {keep.numel():,} neurons"}

        variants = {"sklearn AP+AUROC per neuron, Pool(2)": sk,
                    **({} if big and on_gpu else {"steer score_splits, CPU": on(x, label_ids)}),
                    **({f"steer score_splits, {device}": on(xd, ld)} if on_gpu else {}),
                    f"steer score_state (histograms), {device}": lambda: score_state(state) and {},
                    f"steer stream: histograms + exact top-100 short-list, {device}": refined}
        for fn in list(variants.values())[1:]:  # warm-up of the fast ones (CUDA kernels, thread pools)
            fn()
        result = compare(variants, baseline=next(iter(variants)), repeats=1 if args.quick else 2, warmup=0)
        tables.append(Table(title, result.rows(N=n, neurons=m),
                            note="ratio = variant seconds / scikit-learn seconds (EXTRAPOLATED from the first "
                                 "neurons of layer 0; score_measured_s is what was measured). score_state: "
                                 "histograms built on the device during collection (not timed here)."))
        x = xd = resp = state = variants = None
        free(device)
    return tables


# --------------------------------------------------------------------------------------------

FUNCS = {"smoke": stage_smoke, "tests": stage_tests, "collection": stage_collection,
         "steering": stage_steering, "per_row": stage_per_row, "scoring": stage_scoring}


def write_marker(path: Path, status: str, env: dict, budget) -> None:
    keys = ("stage", "stage_wall_s", "gpu", "device", "torch", "triton", "transformers", "python", "date")
    text = f"status={status}\nbudget_s={budget}\n" + "".join(f"{k}={env.get(k, '')}\n" for k in keys)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", nargs="?", default="all", choices=[*STAGES, "all"])
    p.add_argument("--out", type=Path, default=None,
                   help="write gpu_<stage>.md/.csv and the marker <stage>.done here (gpu.sh's run folder)")
    p.add_argument("--budget", type=float, default=None, help="seconds for this stage, from the process's start")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a dry run of the script")
    p.add_argument("--real", action="store_true", help="Gemma-3-270M's real weights (packaged) instead of random ones")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="sentences of the collection stage (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="most timed repeats (steering: 2 more; per_row: 3 times as many)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if args.threads or (args.quick and device.type == "cpu"):
        # one thread on a shared CPU: two wait at OpenMP barriers for a preempted one (bench/README.md)
        torch.set_num_threads(args.threads or 1)
    # a reserve for writing the results, and for estimates that run over
    dl = Deadline(args.budget, reserve=3.0 + 0.1 * (args.budget or 0))
    kind = "gpu" if device.type == "cuda" else "cpu"
    for stage in STAGES if args.stage == "all" else [args.stage]:
        if args.stage == "all" and stage in ("smoke", "tests"):
            continue  # `all` keeps its old meaning: the benchmarks
        env = environment(args.dtype)
        env.update(stage=stage, device=str(device), stage_budget_s=args.budget if args.budget else "")
        what = {"smoke": "smoke test", "tests": "kernel tests", "collection": "collection paths",
                "steering": "steering overhead", "per_row": "per-row steering",
                "scoring": "scoring and end to end"}[stage]
        models_ = "" if stage == "tests" else (f"{'real Gemma-3-270M and ' if args.real else ''}random weights "
                                               f"with {'a tiny config' if args.quick else 'real configs'}, ")
        title = (f"{kind.upper()} {what}{' (--quick dry run: not a measurement)' if args.quick else ''}: "
                 f"{models_}{args.dtype}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
        name, out_dir = (f"gpu_{stage}", args.out) if args.out else (f"{kind}_{stage}", RESULTS / "quick" if args.quick else RESULTS)

        def partial(tables, env=env, name=name, out_dir=out_dir, title=title):
            now = dict(env, stage_wall_s=round(dl.elapsed(), 1))
            write_results(name, now, tables, title=title, out_dir=out_dir,
                          notes=f"PARTIAL: the stage was still running after {now['stage_wall_s']} s "
                                f"(budget {args.budget or 'none'} s); a finished stage rewrites this file.")

        Tables.sink = partial if args.out else None
        out = FUNCS[stage](args, device, dtype, dl)
        Tables.sink = None
        tables, status = out if isinstance(out, tuple) else (out, "ok")
        if any(r.get("status", "").startswith("skipped") for t in tables for r in t.rows) and status == "ok":
            status = "ok (parts skipped for the budget)"
        if any(isinstance(r.get("error"), str) for t in tables for r in t.rows) and status.startswith("ok"):
            status += "; errors in some variants"
        env["stage_wall_s"] = round(dl.elapsed(), 1)
        finish(env)
        notes = f"Status: {status}. Stage wall time {env['stage_wall_s']} s (budget {args.budget or 'none'} s)."
        write_results(name, env, tables, title=title, notes=notes, out_dir=out_dir)
        if args.out:
            write_marker(args.out / f"{stage}.done", status, env, args.budget)
        print(f"{stage}: {status} in {env['stage_wall_s']} s", flush=True)

if __name__ == "__main__":
    main()
