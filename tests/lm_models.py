"""Small causal LMs and texts for the tests (importable by path from a config:
``tests.lm_models:llama``, ``tests.lm_models:loaders``)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

VOCAB = 64


def llama(width: int = 32, layers: int = 2, vocab: int = VOCAB, seed: int = 0, positions: int = 32):
    """A random Llama (tied embeddings), the same for the same arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        tie_word_embeddings=True))


def texts(n: int, length: int = 16, seed: int = 0):
    """Token sequences of a fixed random bigram language, a third of them right-padded after
    12 tokens: input_ids, attention_mask and labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(99)), -1)
    ids = torch.zeros(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, length):
        ids[:, i] = torch.multinomial(table[ids[:, i - 1]], 1, generator=g)[:, 0]
    mask = torch.ones_like(ids)
    mask[::3, 12:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def rows(ids, mask, labels) -> list[dict]:
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(ids, mask, labels, strict=True)]


def loaders(batch_size: int = 32, n: int = 600):
    """(train, val, test) DataLoaders of dict batches: 2/3, 1/6 and 1/6 of ``n`` texts."""
    data = rows(*texts(n))
    train, val = 2 * n // 3, 5 * n // 6
    return (DataLoader(data[:train], batch_size, shuffle=True), DataLoader(data[train:val], 50),
            DataLoader(data[val:], 50))
