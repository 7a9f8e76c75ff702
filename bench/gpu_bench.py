"""Collection and steering benchmarks on random weights with real configs, every ratio in one run.

Written for a lent GPU machine (no network, at most 64 MiB carried, so the packaged weights stay
behind), and run on this CPU too: models are built from Gemma-3-270M's config (bench/configs/)
and from a 2-layer model with Llama-3-8B's MLP (4096 x 14336), so that the MLP's share of the
time is realistic; `--real` takes Gemma-3-270M's real weights instead of its config (where the
package is installed).

    python bench/gpu_bench.py                 # on CUDA, bf16 -> results/gpu_<case>.md
    python bench/gpu_bench.py steering --device cpu --dtype float32 --real   # -> results/cpu_<case>.md
    python bench/gpu_bench.py --device cpu --quick --dtype float32   # a smoke run anywhere -> results/quick/

Cases (results in bench/results/gpu_<case>.md/.csv, with the device name):
- collection: bare base-model forward (over collect's batches, and over collect_stream's) vs exact
  collection (reference hooks) vs fused collection (Triton op on CUDA) vs streaming (fused +
  histogram kernel) vs today's way (bench/todays_way.py: full LM, corpus order, hooks + host
  copies), ratios to the bare forward (`ratio_same_batches`: streaming vs the bare forward over
  its own batches);
- steering: forward (batch 8) and greedy generation (32 new tokens, batch 1 and 8, KV cache):
  unsteered vs fused vs hook steering, and the same three under torch.compile.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import todays_way  # noqa: E402
from baselines import bare_forward, sorted_plan, stream_plan  # noqa: E402
from harness import RESULTS, Table, compare, environment, finish, write_results  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

from steer import Corpus, Intervention, collect, collect_stream, intervene, load_model, patch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def models(quick: bool, real: bool = False) -> dict:
    gemma = T.Gemma3TextConfig(**json.loads((CONFIGS / "gemma-3-270m.json").read_text()))
    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if quick:  # one small model: a smoke test of the script itself
        return {"small Llama": T.LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=1000)}
    gemma = {"gemma-3-270m (real weights)": "gemma-3-270m"} if real else {"gemma-3-270m config": gemma}
    return {**gemma, "2 layers of Llama-3-8B MLP": llama}


def build(cfg, device, dtype):
    """A model from a config (random weights, seeded) or a `load_model` name (real weights)."""
    if isinstance(cfg, str):
        return load_model(cfg, device=device, dtype=dtype)[0].eval()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


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


def case_collection(args, device, dtype) -> list[Table]:
    tok, data = tiny_tokenizer(), corpus(64 if args.quick else args.n)
    tables = []
    for name, cfg in models(args.quick, args.real).items():
        model = build(cfg, device, dtype)
        kw = dict(batch_size=16, progress=False)

        cal = min(256, len(data) // 4)  # a calibration sample, then streaming updates of the rest
        variants = {
            "bare forward": bare_forward(model, tok, sorted_plan(tok, data), lambda: sync(device)),
            "bare forward, stream's batches": bare_forward(model, tok, stream_plan(tok, data, cal), lambda: sync(device)),
            "exact, hooks": lambda: collect(model, tok, data, backend="hooks", **kw),
            "exact, fused": lambda: collect(model, tok, data, backend="fused", **kw),
            "stream, hooks": lambda: collect_stream(model, tok, data, backend="hooks", calibration=cal, **kw),
            "stream, fused": lambda: collect_stream(model, tok, data, backend="fused", calibration=cal, **kw),
            "today's way": lambda: todays_way.collect(model, tok, data.texts)[1],  # its timing breakdown
        }
        result = compare(variants, baseline="bare forward", repeats=1 if args.quick else args.repeats)
        same = result.variants["bare forward, stream's batches"].min
        rows = [{**r, "ratio_same_batches": r["min_s"] / same if r["variant"].startswith("stream") else ""}
                for r in result.rows(model=name)]
        tables.append(Table(f"Collection on {name} ({len(data)} sentences)", rows))
    return tables


def case_steering(args, device, dtype) -> list[Table]:
    """Three copies of one model, sharing weights, each set up once. Every compiled variant is
    checked against its eager logits (`same_as_eager`): torch skips guards on module hooks by
    default, and steer's `guard_hooks` is what keeps a compiled hooked copy from running the
    unsteered copy's graph."""
    tables = []
    # three instances of one class x prefill / decode x batch sizes: far more graphs than torch's
    # default limit of 8 per frame, past which a frame silently falls back to eager
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    for name, cfg in models(args.quick, args.real).items():
        plain = build(cfg, device, dtype)
        hooked, fused = share_weights(plain), share_weights(plain)
        for model in (hooked, fused):
            if model is fused:
                patch(model)
            intervene(model, Intervention.for_model(model).set(0, list(range(0, 100, 3)), 2.0))
        ids = torch.randint(3, 900, (8, 32 if args.quick else 128), device=device)

        def logits(model):
            with torch.inference_mode():
                return model(input_ids=ids[:, :16]).logits.float()  # the batch-8 prompt of the generate case

        eager = {"unsteered": logits(plain), "fused": logits(fused), "hooks": logits(hooked)}
        for k in ("fused", "hooks"):  # else same_as_eager below could not tell steered from unsteered
            if torch.allclose(eager[k], eager["unsteered"], rtol=2e-2, atol=2e-2 * float(eager[k].abs().max())):
                raise RuntimeError(f"{k} steering does not change the logits beyond the check's tolerance")

        def forward(model, batch):
            with torch.inference_mode():
                model(input_ids=ids[:batch])
            sync(device)

        def generate(model, batch):
            prompt = ids[:batch, :16]
            with torch.inference_mode():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                               min_new_tokens=32, do_sample=False, pad_token_id=0)
            sync(device)

        for label, run, batch in [("forward, batch 8", forward, 8), ("generate 32, batch 1", generate, 1),
                                  ("generate 32, batch 8", generate, 8)]:
            rows = []
            for compiled in (False, True):
                models_ = {"unsteered": plain, "fused": fused, "hooks": hooked}
                originals = {k: m.forward for k, m in models_.items()}
                try:
                    if compiled:
                        torch._dynamo.reset()
                        for m in models_.values():
                            m.forward = torch.compile(m.forward)
                    variants = {k: (lambda m=m: run(m, batch)) for k, m in models_.items()}
                    result = compare(variants, baseline="unsteered", repeats=1 if args.quick else args.repeats + 2)
                    # a compiled variant must compute what it computes eagerly (steering not dropped)
                    same = {k: torch.allclose(logits(m), eager[k], rtol=2e-2, atol=2e-2 * float(eager[k].abs().max()))
                            for k, m in models_.items()}
                    rows += [{**r, "same_as_eager": same[r["variant"]]}
                             for r in result.rows(model=name, case=label, compiled=compiled)]
                except Exception as e:  # a compile failure is a result to report, not a crash
                    rows.append({"model": name, "case": label, "compiled": compiled, "variant": "all",
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
                finally:
                    for k, m in models_.items():
                        m.forward = originals[k]
            tables.append(Table(f"Steering overhead: {label} on {name}", rows))
    return tables


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", nargs="?", default="all", choices=["collection", "steering", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--real", action="store_true", help="Gemma-3-270M's real weights (packaged) instead of random ones")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n", type=int, default=2000, help="sentences of the collection case")
    p.add_argument("--repeats", type=int, default=3, help="collection repeats (steering: 2 more)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    for case, fn in [("collection", case_collection), ("steering", case_steering)]:
        if args.case in (case, "all"):
            env = environment(args.dtype)
            tables = fn(args, device, dtype)
            kind = "gpu" if device.type == "cuda" else "cpu"
            write_results(f"{kind}_{case}", finish(env), tables, out_dir=RESULTS / "quick" if args.quick else RESULTS,
                          title=f"{kind.upper()} {case}: {'real Gemma-3-270M and ' if args.real else ''}"
                                f"random weights with real configs, {args.dtype}, {device}")


if __name__ == "__main__":
    main()
