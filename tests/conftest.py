import os

import pytest

# Notebooks and codecs read this to shrink their work in CI.
os.environ.setdefault("TOOLKIT_SMOKE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


TINY_CORPUS = (
    b"The model predicts the next token; the coder spends -log2 p bits on it.\n"
    b"def f(x):\n    return x * 2 + 1\n"
    b"Compression and prediction are two views of one problem. " * 3
)


def make_tiny_lm(directory, seed: int = 0):
    """A tiny Llama + ByteTokenizer saved with save_pretrained, for codec tests without the shipped model."""
    from toolkit.models.lm import LMShape, build_lm, save_lm
    from toolkit.models.tokenizer import train

    tok = train([TINY_CORPUS * 4], vocab_size=300)
    shape = LMShape(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_positions=64)
    save_lm(build_lm(shape, seed=seed), tok, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "model")


@pytest.fixture(scope="session")
def codec_settings(tiny_lm):
    """Settings that make every registered codec runnable in a test (learned codecs get tiny models)."""
    return {"lm": dict(model=str(tiny_lm), segment=256, streams=3, window=24, keep=8)}
