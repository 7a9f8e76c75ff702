"""Shared by the vLLM tests: a tiny Gemma-3 checkpoint and expert sets found on it by steer.

Each test module skips itself where vLLM is not installed, except under STEER_VLLM_TESTS=1
(`make test-vllm`), where a missing vLLM is an error.
"""
import sys
from pathlib import Path

import pytest
import torch

import steer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_tokenizer  # noqa: E402


def tiny_gemma3(seed=0, intermediate=96):
    import transformers as T

    cfg = T.Gemma3TextConfig(vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64,
                             intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=64)
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny Gemma-3 folder (vLLM's CPU attention needs head_dim 32+), its expert set (found by
    steer on a toy corpus) and a set of another model's shapes."""
    d = tmp_path_factory.mktemp("vllm")
    model, tok = tiny_gemma3(), tiny_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    corpus = steer.Corpus(["the cat sat", "le chat est", "the dog ran", "le chien court", "a man walks",
                           "un homme marche"] * 3, ["en", "fr"] * 9)
    steer.find_experts(model, tok, corpus, k=10, progress=False).experts.save(d / "experts")
    other = tiny_gemma3(intermediate=64)
    steer.find_experts(other, tok, corpus, k=5, progress=False).experts.save(d / "other")
    return d




@pytest.fixture(scope="session")
def served_llama(tmp_path_factory):
    """The same for a tiny Llama (SiLU-gated MLP: vLLM's LlamaMLP)."""
    import transformers as T

    d = tmp_path_factory.mktemp("vllm-llama")
    cfg = T.LlamaConfig(vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64,
                        intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        max_position_embeddings=512)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(1)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tok = tiny_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    corpus = steer.Corpus(["the cat sat", "le chat est", "the dog ran", "le chien court"] * 3, ["en", "fr"] * 6)
    steer.find_experts(model, tok, corpus, k=10, progress=False).experts.save(d / "experts")
    return d
