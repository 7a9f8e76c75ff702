"""steer: find expert neurons in language models and steer models through them.

The public API is re-exported here; each name lives in the module named in the README's table.
"""
from .adapters import NeuronSites
from .analysis import distance_report, retrieval, retrieval_matrix
from .collect import Responses, Scores, Split, collect, collect_stream, refine, score_state
from .corpus import Corpus, CorpusFile, Parallel, bible_corpus, bible_parallel, bible_paraphrases, load_corpus, open_corpus, udhr_parallel
from .embed import embed
from .experts import ExpertSet, export_selfcond, export_statistics, select_experts
from .find import FindConfig, find_experts
from .generation import generate, perplexity
from .backends import intervene
from .intervention import Intervention
from .metrics import auroc, average_precision, score_splits
from .models import load_model
from .runtime import native_dtype
from .patch import patch
from .stream import StreamState

__all__ = [
    "NeuronSites", "distance_report", "retrieval", "retrieval_matrix", "Responses", "Scores", "Split",
    "collect", "collect_stream", "refine", "score_state", "Corpus", "Parallel", "bible_corpus",
    "bible_parallel", "bible_paraphrases", "load_corpus", "open_corpus", "CorpusFile", "udhr_parallel", "embed", "ExpertSet",
    "export_selfcond", "export_statistics", "select_experts", "Intervention", "intervene", "auroc",
    "average_precision", "score_splits", "load_model", "patch", "StreamState", "generate", "perplexity",
    "native_dtype", "find_experts", "FindConfig",
]
