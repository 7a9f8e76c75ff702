"""Tiny random models of the twelve MLP families, built offline from configs."""
import torch
import transformers as T

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "bloom", "xglm", "opt"]
VOCAB = 300
_ATT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

#: the activation each family applies, written independently of the adapters
ACT = {
    "llama": torch.nn.functional.silu, "mistral": torch.nn.functional.silu, "qwen2": torch.nn.functional.silu,
    "qwen3": torch.nn.functional.silu, "phi3": torch.nn.functional.silu,
    "gemma": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gemma2": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gemma3": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gpt2": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "bloom": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "xglm": torch.nn.functional.gelu, "opt": torch.relu,
}


def config(family):
    v = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(**_ATT, **v)
    if family in ("qwen3", "gemma", "gemma2", "gemma3"):
        cls = {"qwen3": T.Qwen3Config, "gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "gemma3": T.Gemma3TextConfig}[family]
        return cls(**_ATT, head_dim=8, **v)
    if family == "phi3":
        return T.Phi3Config(**_ATT, **v)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, **v)
    if family == "bloom":
        return T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **v)
    if family == "xglm":
        return T.XGLMConfig(d_model=32, num_layers=2, attention_heads=4, ffn_dim=48, **v)
    if family == "opt":
        return T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32, **v)
    raise ValueError(family)


def tiny_model(family, dtype=torch.float32, seed=0):
    return from_config(config(family), dtype, seed)


def from_config(cfg, dtype=torch.float32, seed=0):
    """A random model of `cfg`, perturbed: random init leaves some biases at zero and norms at
    one, so every path matters."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def batch(lengths, pad_left=False, seed=1):
    """Random token ids (never pad/bos/eos) with right or left padding: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T_ = max(lengths)
    ids = torch.zeros(len(lengths), T_, dtype=torch.long)
    mask = torch.zeros(len(lengths), T_, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(T_ - n, T_) if pad_left else slice(0, n)
        ids[i, sl] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, sl] = 1
    return ids, mask


def tiny_tokenizer():
    """A character-level tokenizer (ids 3..VOCAB-1) that adds BOS, built in memory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(32, 127)] + list("éèàçüöäßñ") + [chr(c) for c in range(0x430, 0x450)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>")
