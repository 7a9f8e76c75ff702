"""steer: find expert neurons in language models and steer models through them.

The public API is re-exported here; each name lives in the module named in the README's table.
`steer.kernels` is the repository's `kernels/` folder, a namespace package (no `__init__.py`, so
it never shadows Hugging Face's `kernels` in the repository root: `kernels/dispatch.py`). A wheel
holds it as `steer/kernels/`; an editable install, or a source tree imported without an install,
has no finder that maps a namespace subpackage to another folder, so `_map_source_kernels` does.
"""
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _map_source_kernels() -> None:
    if _util.find_spec("steer.kernels") is None:
        spec = _machinery.ModuleSpec("steer.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(_Path(__file__).resolve().parents[1] / "kernels")]
        module = _sys.modules["steer.kernels"] = _util.module_from_spec(spec)
        setattr(_sys.modules[__name__], "kernels", module)


_map_source_kernels()
from steer.core.adapters import NeuronLayout
from steer.core.corpus import Corpus, CorpusFile, Parallel, load_corpus, open_corpus
from steer.core.packaged_corpora import bible_corpus, bible_parallel, bible_paraphrases, udhr_parallel
from steer.core.diffmean import diffmean_directions, diffmean_intervention
from steer.core.experts import ExpertSet, export_selfcond, export_statistics, select_experts
from steer.core.intervention import Intervention, InterventionSets
from steer.core.lape import lape_intervention, select_lape
from steer.core.metrics import auroc, average_precision, score_splits
from steer.core.runtime import native_dtype
from steer.core.scores import Responses, Scores, Split, score_state
from steer.core.stream import StreamState
from steer.core.token_stats import TokenStats
from steer.engine.steering import intervene
from steer.engine.collect import collect, collect_stream, refine
from steer.engine.embed import embed
from steer.engine.generation import generate, perplexity
from steer.engine.models import load_model
from steer.engine.patch import patch
from steer.experiments.analysis import distance_report, retrieval, retrieval_matrix
from steer.find import FindConfig, find_experts


def __getattr__(name: str):
    from steer.core.deprecation import renamed_attribute

    return renamed_attribute(__name__, name)


__all__ = [
    "NeuronLayout", "distance_report", "retrieval", "retrieval_matrix", "Responses", "Scores", "Split",
    "collect", "collect_stream", "refine", "score_state", "Corpus", "Parallel", "bible_corpus",
    "bible_parallel", "bible_paraphrases", "load_corpus", "open_corpus", "CorpusFile", "udhr_parallel", "embed", "ExpertSet",
    "export_selfcond", "export_statistics", "select_experts", "Intervention", "InterventionSets", "intervene", "auroc",
    "average_precision", "score_splits", "load_model", "patch", "StreamState", "generate", "perplexity",
    "native_dtype", "find_experts", "FindConfig", "TokenStats", "select_lape", "lape_intervention",
    "diffmean_directions", "diffmean_intervention",
]
