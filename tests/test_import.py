import subprocess
import sys
import time


def test_import_is_quick_and_does_not_touch_cuda():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import toolkit\n"
        "dt = time.perf_counter() - t\n"
        "print(dt, 'torch' in sys.modules)\n"
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5, out
    assert out[1] == "False"  # torch is not even imported
    assert time.perf_counter() - t < 30


def test_codec_use_does_not_initialise_cuda():
    code = (
        "import toolkit, torch\n"
        "toolkit.decompress(toolkit.compress(b'abc' * 100, codec='xz'))\n"
        "from toolkit import entropy\n"
        "entropy.logits_to_freqs(torch.zeros(2, 8))\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_api_names_resolve():
    import toolkit

    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None
