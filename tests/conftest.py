import os

# Before torch loads OpenMP (as the CLI does): idle worker threads sleep at once instead of spinning,
# which on a shared or loaded CI machine steals the cores the busy threads need (README, Threads).
# Subprocesses of the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_model(family: str, seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, window: int = 100_000, vocab: int = 97):
    """A tiny random causal LM of the given family (fp32, eval mode, sdpa attention)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=window, attn_implementation="sdpa")
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **common))
    else:
        raise ValueError(family)
    return model.eval()


def padded_batch_and_rows(model, new_tokens: int = 10):
    """Generate for two rows of different lengths as one left-padded batch and each row alone; returns
    (batch output, row a alone, row b alone) for the caller to compare the last ``new_tokens``."""
    g = torch.Generator().manual_seed(4)
    a = torch.randint(3, 97, (1, 130), generator=g)
    b = torch.randint(3, 97, (1, 87), generator=g)
    pad = 130 - 87
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 0), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return model.generate(batch, attention_mask=mask, **gen), model.generate(a, **gen), model.generate(b, **gen)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (converted and cached on first use)."""
    import ctxmem

    return ctxmem.load_model("smollm2")
