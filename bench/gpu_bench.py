"""Benchmarks for a lent GPU machine: random weights with real configs, every ratio in one run.

The GPU machine has no network and carries at most 64 MiB, so the packaged weights stay behind:
models are built from Gemma-3-270M's config (bench/configs/) and from a 2-layer model with
Llama-3-8B's MLP (4096 x 14336), so that the MLP's share of the time is realistic.

    python bench/gpu_bench.py                 # on CUDA, bf16
    python bench/gpu_bench.py --device cpu --quick --dtype float32   # a smoke run anywhere

Cases (results in bench/results/gpu_<case>.md/.csv, with the device name):
- collection: bare base-model forward vs exact collection (reference hooks) vs fused collection
  (Triton op on CUDA) vs streaming (fused + histogram kernel), tokens/s and ratios to the bare forward;
- steering: forward (batch 8) and greedy generation (32 new tokens, batch 1 and 8, KV cache):
  unsteered vs fused vs hook steering, and the same three under torch.compile.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Table, compare, environment, finish, write_results  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

from steer import Corpus, Intervention, collect, collect_stream, intervene, patch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def models(quick: bool) -> dict[str, T.PretrainedConfig]:
    gemma = T.Gemma3TextConfig(**json.loads((CONFIGS / "gemma-3-270m.json").read_text()))
    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if quick:  # one small model: a smoke test of the script itself
        return {"small Llama": T.LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=1000)}
    return {"gemma-3-270m config": gemma, "2 layers of Llama-3-8B MLP": llama}


def build(cfg, device, dtype):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def corpus(n: int) -> Corpus:
    rng = random.Random(0)
    chars = "abcdefghijklmnopqrstuvwxyz     "
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(20, 80))) for _ in range(n)]
    return Corpus(texts, [f"l{i % 8}" for i in range(n)])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def case_collection(args, device, dtype) -> list[Table]:
    tok, data = tiny_tokenizer(), corpus(64 if args.quick else 2000)
    tables = []
    for name, cfg in models(args.quick).items():
        model = build(cfg, device, dtype)
        kw = dict(batch_size=16, progress=False)

        def bare():
            ids = tok(data.texts, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                for i in range(0, len(data), 16):
                    model.base_model(input_ids=ids.input_ids[i:i + 16], attention_mask=ids.attention_mask[i:i + 16])
            sync(device)

        variants = {
            "bare forward": bare,
            "exact, hooks": lambda: collect(model, tok, data, backend="hooks", **kw),
            "exact, fused": lambda: collect(model, tok, data, backend="fused", **kw),
            "stream, fused": lambda: collect_stream(model, tok, data, backend="fused", calibration=256, **kw),
        }
        result = compare(variants, baseline="bare forward", repeats=1 if args.quick else 3)
        tables.append(Table(f"Collection on {name} ({len(data)} sentences)", result.rows(model=name)))
    return tables


def case_steering(args, device, dtype) -> list[Table]:
    """Three copies of one model, each set up once (hooks must exist before torch.compile traces)."""
    tables = []
    for name, cfg in models(args.quick).items():
        plain, hooked, fused = build(cfg, device, dtype), build(cfg, device, dtype), build(cfg, device, dtype)
        for model in (hooked, fused):
            if model is fused:
                patch(model)
            intervene(model, Intervention.for_model(model).set(0, list(range(0, 100, 3)), 2.0))
        ids = torch.randint(3, 900, (8, 32 if args.quick else 128), device=device)

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
                    result = compare(variants, baseline="unsteered", repeats=1 if args.quick else 5)
                    rows += result.rows(model=name, case=label, compiled=compiled)
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
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for case, fn in [("collection", case_collection), ("steering", case_steering)]:
        if args.case in (case, "all"):
            env = environment(args.dtype)
            tables = fn(args, device, dtype)
            write_results(f"gpu_{case}" + ("_quick" if args.quick else ""), finish(env), tables,
                          title=f"GPU {case}: random weights, real configs, {args.dtype}, {args.device}")


if __name__ == "__main__":
    main()
