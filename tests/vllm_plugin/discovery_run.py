"""One vLLM engine, every discovery scenario of tests/vllm_plugin/test_discovery.py; results as files.

Run as a script (`python discovery_run.py MODEL OUT --tp 1|2`) in its own process (steer's plugin
patches vLLM's classes for the whole process). Prompts are split over prefill steps
(max_num_batched_tokens=32), so the long sentences of the corpus pool across several steps.
Writes into OUT: exact responses (max and mean pooling, with the token statistics), the stream
mode's state and scores, an interrupted run's checkpoint and its resumed result, and the
uninterrupted run it must equal.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

STEP_TOKENS = 32  # max_num_batched_tokens: a sentence of more tokens is chunked


class Interrupted(Exception):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import DISCOVERY

    import steer
    from safetensors.torch import save_file
    from steer.vllm import discovery
    from vllm import LLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              max_num_batched_tokens=STEP_TOKENS, enable_chunked_prefill=True, tensor_parallel_size=args.tp)
    corpus = steer.Corpus(*DISCOVERY)
    common = dict(k=5, progress=False)
    for pooling in ("max", "mean"):
        found = steer.find_experts(llm, None, corpus, mode="exact", pooling=pooling,
                                   token_stats=("activation", "residual"), **common)
        found.responses.save(out / f"exact_{pooling}.safetensors")
        found.experts.save(out / f"experts_{pooling}")
    stream = dict(mode="stream", calibration=8, bins=8, token_stats=("activation",), batch_size=2, **common)
    found = steer.find_experts(llm, None, corpus, **stream)
    found.state.save(out / "state.safetensors")
    save_file({k: v.contiguous() for k, v in found.scores.flat().items() if v is not None},
              out / "stream_scores.safetensors")
    found.experts.save(out / "experts_stream")

    # a run interrupted after 7 sentences (checkpoints every 2), then resumed
    drain, count = discovery._Pass._drain, [0]

    def interrupted(self, until, finished):
        def one(row):
            finished(row)
            count[0] += 1
            if count[0] == 7:
                raise Interrupted

        return drain(self, until, one if finished else None)

    discovery._Pass._drain = interrupted
    checkpoint = out / "run" / "checkpoint.safetensors"
    try:
        steer.find_experts(llm, None, corpus, checkpoint=checkpoint, checkpoint_every=1, **stream)
        raise AssertionError("not interrupted")
    except Interrupted:
        pass
    finally:
        discovery._Pass._drain = drain
    resumed = steer.find_experts(llm, None, corpus, checkpoint=checkpoint, checkpoint_every=1, resume=True, **stream)
    resumed.state.save(out / "resumed_state.safetensors")
    resumed.experts.save(out / "experts_resumed")
    (out / "done.json").write_text(json.dumps({"tp": args.tp, "chunk": STEP_TOKENS}))


if __name__ == "__main__":
    main()
