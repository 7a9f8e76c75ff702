"""Baseline cross-lingual retrieval of Gemma-3-270M, no intervention, per language and layer.

Sentence embedding = mean over real tokens of a layer's hidden state (steer.embed), cosine
nearest neighbour, en -> xx top-1, raw and per-language mean-centred, on the Bible test split
and on the UDHR fixture. Writes bench/results/retrieval_baseline.md/.csv with the time taken.

    python bench/retrieval_baseline.py [--n 200]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, environment, finish, write_results  # noqa: E402

from steer import bible_parallel, load_model, udhr_parallel
from steer import embed  # noqa: E402
from steer.experiments.analysis import center, retrieval  # noqa: E402

BIBLE = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]
UDHR = ["en", "de", "fr", "es", "it", "pt", "ru", "zh", "ja", "ar", "hi", "tr", "vi"]


def table(name: str, texts: dict[str, list[str]], model, tok) -> tuple[Table, float]:
    start = time.perf_counter()
    embs = {lang: embed(model, tok, t, layers="all") for lang, t in texts.items()}  # lang -> layer -> [N, D]
    layers = sorted(embs["en"])
    rows = []
    for centred in (False, True):
        for layer in layers:
            by_lang = {lang: e[layer] for lang, e in embs.items()}
            if centred:
                by_lang = center(by_lang)
            top1 = {lang: float(retrieval(by_lang["en"], by_lang[lang])["top1"]) for lang in texts if lang != "en"}
            rows.append({"centred": centred, "layer": layer, "mean": sum(top1.values()) / len(top1), **top1})
    seconds = time.perf_counter() - start
    n = len(texts["en"])
    return Table(f"{name}: en -> xx top-1 by layer ({n} aligned sentences; layer 0 = embeddings; "
                 f"{seconds:.0f} s)", rows), seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="Bible test verses")
    args = p.parse_args(argv)
    env = environment("float32")
    model, tok = load_model("gemma-3-270m", dtype="float32", device="cpu")
    bible, _ = table("Bible test split", bible_parallel(BIBLE, split="test", n=args.n).texts, model, tok)
    udhr, _ = table("UDHR", udhr_parallel(UDHR).texts, model, tok)
    write_results("retrieval_baseline", finish(env), [bible, udhr],
                  title="Cross-lingual retrieval of Gemma-3-270M without intervention")


if __name__ == "__main__":
    main()
