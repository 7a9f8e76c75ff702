"""One vLLM engine, every scenario of tests/vllm_plugin/test_plugin.py, results as JSON.

Run as a script (`python engine_run.py MODEL EXPERTS OUT.json --mode eager|compiled`), in its
own process: steer's plugin patches vLLM's classes for the whole process, so the stock engine
(VLLM_PLUGINS="") and the plugin's engines never share one. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the neuron tensor can be read through forward pre-hooks
on `down_proj`. Long prompts are split over prefill steps (max_num_batched_tokens=32).
"""
import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

SHORT = ["the cat sat", "le chat est"]
LONG = "the quick brown fox jumps over the lazy dog, " * 3  # 135 characters: 5 prefill chunks
STEPS = 6
BAD = {
    "missing": {"steer_experts": "/nonexistent/experts", "steer_label": "fr"},
    "shapes": {"steer_experts": "{other}", "steer_label": "fr"},
    "k": {"steer_experts": "{experts}", "steer_label": "fr", "steer_k": 10_000},
    "label": {"steer_experts": "{experts}", "steer_label": "xx"},
    "positions": {"steer_experts": "{experts}", "steer_label": "fr", "steer_positions": "middle"},
    "strength": {"steer_experts": "{experts}", "steer_label": "fr", "steer_strength": float("inf")},
    "key": {"steer_experts": "{experts}", "steer_label": "fr", "steer_layers": 3},
    "file_missing": {"steer_intervention": "/nonexistent/intervention.safetensors"},
    "file_shape": {"steer_intervention": "{dir}/resid_other.safetensors"},
    "file_keys": {"steer_intervention": "{dir}/lape.safetensors", "steer_label": "fr"},
}
FILES = ("lape", "diffmean", "act_set", "resid_set")  # saved interventions (conftest.interventions)


def steer(experts, label="fr", positions="all", strength=4.0, **extra):
    return {"steer_experts": experts, "steer_label": label, "steer_positions": positions,
            "steer_strength": strength, **extra}


def scenarios(args, out, configs, run, params, llm):
    """The mixed batch, the prefix cache and the bad requests."""
    # one batch: unsteered rows between rows of four configs
    mixed = [None, "all", "last", None, "prompt", "en_k3", "generated", "lape", "resid_set", "act_set", None,
             "diffmean", "resid_last"]
    prompts = [SHORT[i % 2] if i % 3 else LONG for i in range(len(mixed))]
    out["mixed"] = {"names": mixed, "prompts": prompts,
                    "results": run(prompts, [None if m is None else configs[m] for m in mixed])}
    # prefix cache: the same long prompt steered, then not, then steered (and the other order)
    out["prefix"] = [run([LONG], [c])[0] for c in (configs["all"], None, configs["all"], None)]
    # bad requests: refused at admission, the engine serves on
    out["bad"] = {}
    for name, extra in BAD.items():
        extra = {k: v.format(experts=args.experts, other=args.other, dir=os.path.dirname(args.experts))
                 if isinstance(v, str) else v for k, v in extra.items()}
        try:
            llm.generate(SHORT, [params(None), params(extra)], use_tqdm=False)
            out["bad"][name] = None
        except Exception as e:  # noqa: BLE001 - the test reads the message
            out["bad"][name] = f"{type(e).__name__}: {e}"
    out["after_bad"] = run(SHORT + [LONG], [None] * 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("experts")
    ap.add_argument("out")
    ap.add_argument("--other", help="an expert set of another model's shapes")
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--basic", action="store_true", help="unsteered, 'all' and 'last' runs and the neurons only")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.mode == "eager", max_model_len=256,
              max_num_batched_tokens=32, enable_chunked_prefill=True, seed=0)

    def params(extra=None, steps=STEPS):
        return SamplingParams(max_tokens=steps, temperature=0.0, logprobs=5, extra_args=extra)

    def run(prompts, extras):
        outs = llm.generate(prompts, [params(e) for e in extras], use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                 "first": {str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}} for o in outs]

    out = {"plain": run(SHORT + [LONG], [None] * 3)}
    if os.environ.get("VLLM_PLUGINS") == "":  # stock vLLM: the unsteered runs only
        with open(args.out, "w") as f:
            json.dump(out, f)
        return
    configs = {"all": steer(args.experts), "prompt": steer(args.experts, positions="prompt"),
               "generated": steer(args.experts, positions="generated"),
               "last": steer(args.experts, positions="last"),
               "en_k3": {**steer(args.experts, label="en", strength=8.0), "steer_k": 3},
               **{name: {"steer_intervention": os.path.join(os.path.dirname(args.experts), f"{name}.safetensors")}
                  for name in FILES}}
    configs["resid_last"] = {**configs["resid_set"], "steer_positions": "last"}
    if args.basic:
        configs = {name: configs[name] for name in ("all", "last", *FILES)}
    out["alone"] = {name: run(SHORT + [LONG], [c] * 3) for name, c in configs.items()}
    if not args.basic:
        scenarios(args, out, configs, run, params, llm)

    # the first forward of one prompt, steered at each site and not: per layer the neuron tensor
    # (the input of down_proj), gate_up (the output of gate_up_proj) and the stream after the
    # decoder layer (h + r of its output, as vLLM's next add-norm adds them)
    seen = {}

    def capture(model):
        def keep(store, key, tensor):  # a hook returns None: it reads, never replaces
            store.setdefault(key, tensor.detach().cpu().tolist())

        handles = []
        for name, module in model.named_modules():
            parts = name.split(".layers.")
            if len(parts) != 2:
                continue
            layer, rest = int(parts[1].split(".")[0]), parts[1].partition(".")[2]
            store = seen.setdefault(layer, {})
            if rest == "mlp.down_proj":
                handles.append(module.register_forward_pre_hook(lambda m, i, s=store: keep(s, "h", i[0])))
            elif rest == "mlp.gate_up_proj":
                handles.append(module.register_forward_hook(lambda m, i, o, s=store: keep(s, "gate_up", o[0])))
            elif rest == "":
                handles.append(module.register_forward_hook(lambda m, i, o, s=store: keep(s, "stream", o[0] + o[1])))
        return handles

    if args.mode == "eager":  # hooks on a compiled model would not run inside its graph
        handles = llm.apply_model(capture)[0]
        out["tensors"] = {}
        for name in ("plain", "all", *FILES):
            extra = None if name == "plain" else configs[name]
            llm.generate([SHORT[0]], [SamplingParams(max_tokens=1, extra_args=extra)], use_tqdm=False)
            out["tensors"][name] = {str(k): dict(v) for k, v in seen.items()}
            for v in seen.values():
                v.clear()
        llm.apply_model(lambda model: [h.remove() for h in handles])
    out["torch_threads"] = torch.get_num_threads()
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
