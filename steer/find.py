"""`find_experts`: a labelled corpus in, scores and an expert set out — the main job as one verb.

It makes the one decision the caller should not have to: how to collect.
- exact: keep every response (sentences x neurons x 4 bytes) and score it exactly;
- stream: fixed-memory histograms, then `refine` rescores exactly every neuron that could still
  be in the top-k, so the experts and their values equal exact mode's.
"auto" takes exact while the response table fits `memory_budget_gib`, stream beyond (below that
size one exact pass beats streaming's two), and stream whenever checkpoints or several processes
(torchrun) are involved. Backend "auto" (`steer.engine.steering.choose`) collects through the
fused patch where it gives the hooks' exact responses (float32 on the CPU: measured faster),
through the hooks elsewhere. Given a vLLM engine instead of a transformers model, the same modes
run inside vLLM's forward (`steer.vllm.discovery.run`). The CLI (`steer find-experts`) and
`steer study` call this function.

Every check runs once, before the model loads where it can: `FindConfig.validate` (the options),
`plan` (the corpus and its splits: unknown targets or negatives), `Plan.fit` (what needs the
model: layers and k in range, the mode). The CLI calls `plan` before loading the model and hands
the `Plan` to `find_experts`, which then checks nothing twice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from steer.core.adapters import NeuronLayout, check_eval
from steer.core.corpus import check_labels
from steer.core.experts import RECIPES, ExpertSet, check_k, select_experts
from steer.core.scores import Responses, Scores, Split
from steer.core.stream import StreamState
from steer.engine.steering import check_choice, choose
from steer.engine.batching import MAX_TOKENS, WINDOW, check_batching
from steer.engine.collect import check_stream, collect, collect_stream, refine
from steer.engine.distributed import Group, current

MODES = ("auto", "exact", "stream")


@dataclass
class FindConfig:
    """How to find experts. `recipe` (finding-experts | sundar2025) overrides by / value / min_auroc."""

    k: int = 100
    recipe: str | None = None
    by: str = "ap"
    value: str = "on_p50"
    min_auroc: float | None = None
    bottom_k: int = 0
    layers: list[int] | None = None
    targets: list[str] | None = None  # labels to find experts for (default: every label)
    negatives: list[str] | None = None  # negative labels (default: every other label)
    mode: str = "auto"
    memory_budget_gib: float = 2.0
    pooling: str = "max"
    batch_size: int = 16
    max_tokens: int | None = MAX_TOKENS
    skip_special: bool = True
    max_length: int | None = None
    too_long: str = "truncate"
    backend: str = "auto"  # "auto": fused where it gives the hooks' exact responses, faster (steering.choose)
    bins: int = 64
    calibration: int = 1000
    window: int = WINDOW
    seed: int = 0
    checkpoint: str | Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    token_stats: tuple[str, ...] = ()  # also collect LAPE ("activation") / DiffMean ("residual") sums
    validated: bool = field(default=False, init=False, repr=False, compare=False)  # by `validate`

    def selection(self) -> tuple[str, str, float | None]:
        """(by, value, min_auroc) after the recipe."""
        if self.recipe is not None:
            if self.recipe not in RECIPES:
                raise ValueError(f"recipe {self.recipe!r}: choose one of {sorted(RECIPES)}")
            return RECIPES[self.recipe]
        return self.by, self.value, self.min_auroc

    def validate(self) -> "FindConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {MODES}")
        self.selection()
        check_k(self.k, "k")
        check_k(self.bottom_k, "bottom_k", allow_zero=True)
        if self.memory_budget_gib <= 0:
            raise ValueError(f"memory_budget_gib={self.memory_budget_gib}: must be positive")
        check_choice(self.backend)
        check_batching(self.pooling, self.too_long, self.batch_size, self.window, self.max_tokens)
        check_stream(self.bins, self.calibration, self.checkpoint, self.checkpoint_every, self.resume)
        if self.mode == "exact" and (self.checkpoint_every or self.resume):
            raise ValueError("checkpoints are a streaming feature: use mode stream (or auto)")
        self.validated = True
        return self

    def select(self, scores: Scores) -> ExpertSet:
        """The expert set these options select from `scores`."""
        by, value, min_auroc = self.selection()
        return select_experts(scores, self.k, by=by, value=value, bottom_k=self.bottom_k,
                              layers=self.layers, min_auroc=min_auroc)

    def check_model(self, layout: NeuronLayout) -> None:
        """The options that need the model: layers in range, k and bottom_k within its neurons."""
        layers = self.layers if self.layers is not None else range(layout.n_layers)
        bad = [l for l in layers if not 0 <= l < layout.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {layout.n_layers} layers")
        n = len(set(layers)) * layout.width
        where = "the model has {n} neurons" if self.layers is None else "the chosen layers hold {n} neurons"
        check_k(self.k, "k", available=n, where=where)
        check_k(self.bottom_k, "bottom_k", allow_zero=True, available=n, where=where)


@dataclass
class Found:
    """What `find_experts` returns: every neuron's scores, the expert set, and how they were made."""

    scores: Scores
    experts: ExpertSet
    mode: str  # "exact" or "stream"
    responses: Responses | None = None  # exact mode: every response (for re-scoring)
    state: StreamState | None = None  # stream mode: the histogram state

    @property
    def settings(self) -> dict:
        return self.scores.settings

    @property
    def token_stats(self):
        """The LAPE / DiffMean token sums collected in the same pass (`FindConfig.token_stats`), or None."""
        source = self.responses if self.responses is not None else self.state
        return None if source is None else source.token_stats


def splits_for(labels: list[str], targets: list[str] | None = None,
               negatives: list[str] | None = None) -> list[Split]:
    """One split per target: the target against `negatives` (default: every other label)."""
    unknown = [t for t in (targets or []) + (negatives or []) if t not in labels]
    if unknown:
        raise ValueError(f"labels {unknown} are not in the corpus (its labels: {labels})")
    targets = targets or labels
    if negatives is None:
        return [Split.one_vs_rest(t) for t in targets]
    splits = [Split(t, (t,), tuple(n for n in negatives if n != t)) for t in targets]
    alone = [s.name for s in splits if not s.negative]
    if alone:
        raise ValueError(f"targets {alone} have no negative label (negatives: {negatives})")
    return splits


@dataclass
class Plan:
    """A find-experts job, checked: the validated options, the corpus and its splits (`plan`), and
    once a model is given (`fit`), the mode."""

    config: FindConfig
    corpus: object
    splits: list[Split]
    mode: str | None = None
    _fitted: object = field(default=None, repr=False)  # the model `mode` was chosen for

    def fit(self, model, group: Group | None = None) -> str:
        """Check what needs the model (layers, k; eval mode) and choose the mode, once per model
        (a transformers model, or a vLLM engine: `steer.vllm.discovery.served`)."""
        if self._fitted is not model:
            if is_engine(model):
                from steer.vllm.discovery import served

                if self.config.backend != "auto":
                    raise ValueError(f"backend={self.config.backend!r} chooses how transformers models collect; "
                                     "a vLLM engine collects through steer's plugin (leave backend 'auto')")
                layout = served(model)
            else:
                check_eval(model)
                layout = NeuronLayout(model)
            self.config.check_model(layout)
            self.mode = choose_mode(self.config, len(self.corpus), layout.n_neurons, group)
            self._fitted = model
        return self.mode


def plan(corpus, config: FindConfig | None = None, **overrides) -> Plan:
    """Check a job before any model loads: the options (`config` with keyword `overrides`), the
    corpus's labels, and the targets and negatives against them."""
    if overrides or config is None:
        config = dataclasses.replace(config or FindConfig(), **overrides)
    if not config.validated:
        config.validate()
    check_labels(corpus)
    return Plan(config, corpus, splits_for(list(corpus.label_names), config.targets, config.negatives))


def choose_mode(config: FindConfig, n_sentences: int, n_neurons: int, group: Group | None = None) -> str:
    """exact or stream (see the module docstring)."""
    group = group or current()
    if group.active:
        if config.mode == "exact":
            raise ValueError("mode exact runs in one process; under torchrun use stream (or auto)")
        return "stream"
    if config.mode != "auto":
        return config.mode
    if config.checkpoint_every or config.resume:
        return "stream"
    return "exact" if n_sentences * n_neurons * 4 <= config.memory_budget_gib * 2**30 else "stream"


def is_engine(model) -> bool:
    """Whether `model` is a vLLM `LLM` (told without importing vLLM)."""
    return type(model).__name__ == "LLM" and type(model).__module__.startswith("vllm")


def find_experts(model, tokenizer, corpus, config: FindConfig | None = None, *,
                 group: Group | None = None, **overrides) -> Found | None:
    """Collect `corpus`'s responses, score every neuron and select the experts of each target.

    model: a transformers causal LM, or a `vllm.LLM` (the engine; then `tokenizer` may be None, the
    model's own is read): steer's vLLM plugin pools inside vLLM's forward
    (`steer.vllm.discovery`), with the same modes, results and files.
    corpus: a `Corpus` or `CorpusFile`, or a `Plan` already checked by `plan` (then no config).
    config: a `FindConfig`; keyword `overrides` replace its fields (`find_experts(m, t, c, k=50)`).
    Under torchrun every rank calls it; rank 0 gets the result, the others None.
    """
    if isinstance(corpus, Plan):
        if config is not None or overrides:
            raise TypeError("find_experts: a Plan carries its config; pass no config or overrides with it")
        job = corpus
    else:
        job = plan(corpus, config, **overrides)
    config, corpus, splits = job.config, job.corpus, job.splits
    group = group or current()
    mode = job.fit(model, group)
    if is_engine(model):
        from steer.vllm.discovery import run

        responses, state, scores = run(model, tokenizer, job)
        return Found(scores, config.select(scores), mode, responses, state)
    by = config.selection()[0]
    backend = choose(model, config.backend)  # "auto" resolved once: settings record what ran
    opts = dict(pooling=config.pooling, batch_size=config.batch_size, max_tokens=config.max_tokens,
                skip_special=config.skip_special, max_length=config.max_length, backend=backend,
                too_long=config.too_long, progress=config.progress, token_stats=tuple(config.token_stats))
    responses = state = None
    if mode == "exact":
        responses = collect(model, tokenizer, corpus, **opts)
        scores = responses.score(splits)
    else:
        if config.checkpoint is not None:
            Path(config.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        state = collect_stream(model, tokenizer, corpus, bins=config.bins, seed=config.seed,
                               calibration=config.calibration, window=config.window,
                               checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every,
                               resume=config.resume, group=group, **opts)
        scores = refine(model, tokenizer, corpus, state if group.is_main else None, splits, k=config.k,
                        by=by, bottom_k=config.bottom_k, group=group, batch_size=config.batch_size,
                        max_tokens=config.max_tokens, backend=backend, window=config.window,
                        progress=config.progress)
    if not group.is_main:
        return None
    return Found(scores, config.select(scores), mode, responses, state)
