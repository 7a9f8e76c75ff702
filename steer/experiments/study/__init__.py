"""`steer study`: the seed paper's analysis end to end, with every choice made on held-out dev data.

Sundar et al. (ACL 2025), "Steering into New Embedding Spaces", force a language's expert
neurons and measure how the model's embedding space moves. This package runs that protocol on
the Bible splits of `steer.core.corpus` (verse-disjoint "discovery" / "dev" / "test") and the UDHR:

  1. discovery  collect pooled neuron responses once for the targets and the negative languages,
                score once with the paper's splits (target vs the other targets + zh), select the
                top max(k grid) experts per target (sundar2025: AUROC > 0.5 then top-k by AUROC,
                forced to on_mean; `recipe="finding-experts"`: AP, forced to on_p50).
  2. dev        for every target and k of the grid, embed the dev verses of every language with the
                experts forced (one intervened model embeds queries and candidates, the paper's
                setting; `sides="target"` intervenes only while embedding the target language) and
                score retrieval. `choose()` picks k per target (and the read-out layer with
                `layer_search`) from these dev records only. Nothing of the test split exists yet.
  3. test       Bible test verses with the chosen k: distances pre/post (Table 1), retrieval pre/post
                in settings (a) query = target and (b) neither language is the target, with paired
                bootstrap CIs, Pearson r between retrieval and distance (Table 2), paraphrase
                retrieval pre/post/mixed (Table 3), the random-neuron control (same k, same values,
                random neurons, several seeds) and, optionally, a descriptive k sweep.
  4. udhr       the same distances and retrieval on 50 aligned UDHR paragraphs.
  5. report     `report.md`, PNG figures and `results.json` (every number, the configuration,
                seeds, versions, corpus hashes, stage times).

Embeddings: mean over a sentence's real tokens of one hidden state (`steer.embed`; BOS left out
by default). Cosine distances are always computed on the raw embeddings (centring would erase
language means). Retrieval is computed both raw and with per-language mean-centring; `center`
picks which one is *primary* (the one the dev criterion uses and the figures show). Default: raw,
as in the paper.

Caching: the unsteered model's embeddings are computed once per text and reused by every
condition (pre of dev, test, control subsets, paraphrases, mixed retrieval); an intervened
model's embeddings are computed per condition (a condition is identified by a hash of the
intervention's buffers), so a paraphrase text that is also a test verse is embedded once per
condition. With a cache directory, the per-condition tables persist across runs (a resumed run
recomputes nothing it has; the stage table says how many sentences came from the cache).

Dose curves (`curves=True`, `steer study --curves`): a methods study is extended in its own folder
with every method's dose curve on dev (forcing, fluency, retrieval, perturbation size), matched
comparisons and the report's curve sections (`curves`; the perturbation measure is
`steer.experiments.perturbation`).

Modules: `config` (StudyConfig, --full), `cache` (the Embedder and its embedding cache),
`measures` (retrieval, distance and correlation summaries), `choice` (k and layer from dev),
`control` (the random-neuron control), `curves` (dose curves), `protocol` (the stages and
`run_study`), `verdict`,
`figures`, `report` (report.md, one function per section; `render_only`), `cli` (`steer study`).
"""
from steer.experiments.study.config import StudyConfig
from steer.experiments.study.protocol import run_study
from steer.experiments.study.report import render_only

__all__ = ["StudyConfig", "render_only", "run_study"]
