"""Shared pieces of the llm quantization tests: tiny model shapes and the one-thread fixture."""

import pytest
import torch

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: on a shared machine intra-op threads only add contention
    # (10x slower GPTQ under load). Restored for the other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shape(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
