"""`steer study`: its options (every field of `StudyConfig`), `--render` and the run."""
from __future__ import annotations

import argparse

from steer.cli.options import add_machine, csv_list
from steer.core.experts import RECIPES

from steer.experiments.study import __doc__ as STUDY_DOC
from steer.experiments.study.config import CONTROL_LAYERS, CRITERIA, SIDES, StudyConfig, as_config
from steer.experiments.study.methods import METHODS
from steer.experiments.study.protocol import run_study
from steer.experiments.study.report import render_only


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `study` subcommand on an argparse subparsers object."""
    d = StudyConfig()
    p = subparsers.add_parser(
        "study", help="the seed paper's analysis: experts on discovery, k on dev, measures on test and UDHR",
        description=STUDY_DOC.splitlines()[0],
        epilog=("Defaults are sized for a 2-core CPU (about 0.6 M tokens through Gemma-3-270M). --full runs the "
                "complete protocol (targets en,de,fr,es,ja; all 22 Bible languages; k up to 2000; a descriptive "
                "k sweep on test); options given explicitly override it."))
    p.add_argument("--model", default=None, help=f"built-in name or local checkpoint (default {d.model})")
    p.add_argument("--targets", type=csv_list, default=None, help=f"target languages (default {','.join(d.targets)})")
    p.add_argument("--languages", type=csv_list, default=None,
                   help=f"evaluated languages (default {','.join(d.languages)}; with --eval-corpus, its columns)")
    p.add_argument("--negatives", type=csv_list, default=None,
                   help="negative languages besides the other targets (default zh)")
    p.add_argument("--eval-corpus", metavar="FILE", default=None,
                   help="aligned text for dev and test instead of the Bible: .tsv with a header row of ISO 639-1 "
                        "codes and one translation per column, or .jsonl with one {code: text} object per line; "
                        "rows are cut into dev and test by a seeded hash (at most --n-dev / --n-test)")
    p.add_argument("--discovery-corpus", metavar="FILE", default=None,
                   help="labelled text to find experts in instead of the Bible (.tsv label<TAB>text, .jsonl, or a "
                        "folder of <code>.txt; labels are ISO 639-1 codes): every target and negative must be "
                        "there; at most --n-discovery sentences per language, a seeded sample")
    p.add_argument("--methods", type=csv_list, default=None,
                   help=f"methods compared, experts among them: {','.join(METHODS)} (default experts). Each gets a "
                        "strength chosen on dev (k; the LAPE top_rate; DiffMean's layer and scale), the same test "
                        "retrieval, distances and paraphrases, and language steering in generation")
    p.add_argument("--lape-rates", type=lambda s: [float(x) for x in csv_list(s)], default=None,
                   help=f"LAPE top_rate values tried on dev (default {','.join(map(str, d.lape_rates))})")
    p.add_argument("--diffmean-layers", type=lambda s: [int(x) for x in csv_list(s)], default=None,
                   help="decoder layers (from 0) DiffMean may steer (default: a quarter, half and three quarters up)")
    p.add_argument("--diffmean-scales", type=lambda s: [float(x) for x in csv_list(s)], default=None,
                   help="DiffMean strengths tried on dev, as multiples of the length of the mean difference "
                        "(target minus the other languages) at the layer "
                        f"(default {','.join(map(str, d.diffmean_scales))})")
    p.add_argument("--curves", action="store_true", default=None,
                   help="add dose curves (every method across strengths, on dev) to the methods study in --out: "
                        "forcing, perplexity ratio, repetition, retrieval and perturbation size per dose")
    floats = lambda s: [float(x) for x in csv_list(s)]  # noqa: E731
    for name, kind, help_ in (("curve-k", lambda s: [int(x) for x in csv_list(s)], "experts' and random k at 1x"),
                              ("curve-multipliers", floats, "multipliers of the forced values at the largest k"),
                              ("curve-lape-rates", floats, "LAPE top_rate values"),
                              ("curve-scales", floats, "DiffMean scales, at every DiffMean layer")):
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"curves: {help_} (default {','.join(map(str, getattr(d, name.replace('-', '_'))))})")
    p.add_argument("--n-curve-dev", type=int, default=None,
                   help=f"curves: dev verses per language for retrieval (default {d.n_curve_dev})")
    for name, help_ in (("n-generate", "BOS-prompted samples per method and target"),
                        ("gen-tokens", "new tokens per sample"),
                        ("n-heldout", "held-out test sentences of the target for perplexity")):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{help_} (default {getattr(d, name.replace('-', '_'))})")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="sundar2025 (default): AUROC > 0.5, top-k, forced to the mean positive response; "
                        "finding-experts: AP, forced to the median")
    p.add_argument("--pooling", choices=["mean", "max"], default=None,
                   help="response of a neuron to a sentence (default mean over real tokens)")
    for name, help_ in (("n-discovery", "discovery verses per language"), ("n-dev", "dev verses per language"),
                        ("n-test", "test verses per language"), ("n-control", "test verses for the random control"),
                        ("n-paraphrase", "test verses per paraphrase pair")):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{help_} (default {getattr(d, name.replace('-', '_'))})")
    p.add_argument("--k-grid", type=lambda s: [int(x) for x in csv_list(s)], default=None,
                   help=f"k values tried on dev (default {','.join(map(str, d.k_grid))})")
    p.add_argument("--layer", type=int, default=None,
                   help="read-out hidden state (0 = embeddings, L = last, after the final norm; default last)")
    p.add_argument("--layer-search", action="store_true", default=None, help="choose the read-out layer on dev too")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="dev criterion: a = mean top-1 of setting (a) pairs (default); ab = mean of settings (a) and (b)")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=None,
                   help="primary retrieval on per-language mean-centred embeddings (default: raw, as the paper)")
    p.add_argument("--sides", choices=SIDES, default=None,
                   help="both: one intervened model embeds queries and candidates (default, the paper's); "
                        "target: only target-language text is embedded with the experts forced")
    p.add_argument("--control-seeds", type=int, default=None, help=f"random-control seeds (default {d.control_seeds})")
    p.add_argument("--control-layers", choices=CONTROL_LAYERS, default=None,
                   help="random neurons from the whole model (any, default) or each expert's layer (matched)")
    p.add_argument("--no-udhr", dest="udhr", action="store_false", default=None, help="skip the UDHR")
    p.add_argument("--no-paraphrases", dest="paraphrases", action="store_false", default=None,
                   help="skip paraphrase retrieval")
    p.add_argument("--test-k-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure every k on test (descriptive; never used for a choice)")
    p.add_argument("--n-boot", type=int, default=None, help=f"bootstrap resamples (default {d.n_boot})")
    p.add_argument("--seed", type=int, default=None, help="split, bootstrap and control seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--keep-bos", dest="skip_bos", action="store_false", default=None,
                   help="include the BOS token in the mean-pooled embedding")
    p.add_argument("--out", default=None, help=f"output folder (default {d.out})")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default <steer cache>/study)")
    p.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    p.add_argument("--generation-results", default=None,
                   help="a language-steering results JSON to render as an extra report section "
                        "(default: <out>/generation.json when present)")
    add_machine(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--full", action="store_true", default=None, help="the complete protocol for a bigger machine")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="only re-draw figures and report.md from an existing results.json")
    p.set_defaults(func=cmd_study)
    return p


def config_from_args(args) -> StudyConfig:
    skip = {"func", "command", "no_cache", "quiet", "render", "debug"}
    values = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    cfg = as_config(values)
    if args.no_cache:
        cfg.cache_dir = None
    if args.quiet:
        cfg.progress = False
    return cfg


def cmd_study(args) -> None:
    if args.render:
        render_only(args.render, args.out)
        return
    cfg = config_from_args(args)
    results = run_study(cfg)
    print(f"\nchosen on dev: layer {results['dev']['chosen']['layer']}, k {results['dev']['chosen']['k']}")
    for v in results["verdict"]:
        print(f"  {v['claim']} [{v['target']}]: {'yes' if v['holds'] else 'no'}")
