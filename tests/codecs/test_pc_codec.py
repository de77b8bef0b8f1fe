"""The pc codec: PNG images (patch model) and .npy record sets (dataset mode), exact round trips."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import toolkit
from toolkit.circuits import EMConfig, PatchModel, fit_hclt, train_patch_model
from toolkit.errors import ModelMismatchError, ToolkitError, UnsupportedInputError
from toolkit.formats import encode_png

torch.set_num_threads(1)


def _photo(h: int, w: int, colour: bool, seed: int = 0) -> np.ndarray:
    """A smooth picture with noise: gradients and a disc, so the predictor has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    disc = ((y - h / 2) ** 2 + (x - w / 3) ** 2) < (h / 3) ** 2
    base = 90 + 60 * np.sin(x / 7.0) + 40 * np.cos(y / 5.0) + 50 * disc
    chans = [base + rng.normal(0, 3, (h, w)) + 15 * c for c in range(3 if colour else 1)]
    im = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)
    return im if colour else im[..., 0]


def _png(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def patch_model(tmp_path_factory) -> str:
    imgs = [_photo(40, 48, True, s) for s in range(2)] + [_photo(36, 44, False, 5)]
    model, _ = train_patch_model(imgs, EMConfig(epochs=2), patch=4, num_latents=4)
    path = tmp_path_factory.mktemp("pc") / "patch"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def digits_circuit(tmp_path_factory) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(1)
    # 6x6 records with 5 levels: blobs plus noise, enough structure for a tree.
    base = rng.integers(0, 5, (200, 1, 1))
    x = np.clip(base + rng.integers(-1, 2, (200, 6, 6)), 0, 4).astype(np.uint8)
    circuit, hist = fit_hclt(x[:150], EMConfig(epochs=3), num_latents=4, num_cats=5)
    assert len(hist) == 3
    path = tmp_path_factory.mktemp("pc") / "digits"
    circuit.save(path)
    return str(path), x[150:]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(37, 29), (21, 30, 3), (4, 4, 3), (1, 1)])
def test_png_round_trip_odd_sizes(patch_model, shape):
    pixels = _photo(shape[0], shape[1], len(shape) == 3, seed=3)
    for data in (_png(pixels), _png(pixels, optimize=True), encode_png(pixels)):
        blob = toolkit.compress(data, codec="pc", model=patch_model)
        assert toolkit.decompress(blob) == data
        assert toolkit.info(blob)["header"]["codec"] == "pc"


def test_npy_round_trip_and_orders(digits_circuit):
    path, held = digits_circuit
    for arr in (held, held.reshape(len(held), -1), np.asfortranarray(held)):
        data = _npy(arr)
        blob = toolkit.compress(data, codec="pc", model=path)
        assert toolkit.decompress(blob) == data
    # 36 values of 5 levels per record: the circuit's payload beats the raw bytes, so it is kept
    assert toolkit.info(toolkit.compress(_npy(held), codec="pc", model=path))["methods"]["codec"] == 1


def test_fresh_process_decode(digits_circuit, patch_model, tmp_path):
    path, held = digits_circuit
    cases = {"d.npy": (_npy(held), path), "i.png": (_png(_photo(23, 17, True)), patch_model)}
    for name, (data, model) in cases.items():
        (tmp_path / (name + ".tkz")).write_bytes(toolkit.compress(data, codec="pc", model=model))
        out = tmp_path / ("out-" + name)
        r = subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tmp_path / (name + ".tkz")),
                            "-o", str(out), "-q"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == data


def test_model_mismatch_refused(digits_circuit, tmp_path):
    """A circuit changed on disk at the same path is noticed (the store re-reads changed files) and refused."""
    import shutil

    path, held = digits_circuit
    mine = tmp_path / "circuit"
    shutil.copytree(path, mine)
    blob = toolkit.compress(_npy(held), codec="pc", model=str(mine))
    other, _ = fit_hclt(held, EMConfig(epochs=1, seed=7), num_latents=3, num_cats=5)
    shutil.rmtree(mine)
    other.save(str(mine))
    with pytest.raises(ModelMismatchError):
        toolkit.decompress(blob)


def test_bad_inputs_give_clean_errors(digits_circuit, patch_model):
    path, held = digits_circuit
    # each case: the input, the model, and a phrase its one-line message must carry
    bad = {
        "text": (b"just some notes\n" * 20, patch_model, "neither"),
        "wrong shape": (_npy(held.reshape(len(held), 4, 9)[:, :3]), path, "27 values"),
        "wrong values": (_npy(np.full((3, 36), 9, np.uint8)), path, "values up to 9"),
        "wrong dtype": (_npy(held.astype(np.int16)), path, "int16"),
        "pickle": (_pickled_npy(), path, "never unpickled"),
        "npy for patch model": (_npy(held), patch_model, "model=DIR"),
        "png for circuit": (_png(_photo(8, 8, False)), path, "patch model"),
        "rgba png": (_png(np.zeros((5, 5, 4), np.uint8)), patch_model, "colour type 6"),
        "truncated png": (_png(_photo(20, 20, False))[:-30], patch_model, "PNG"),
    }
    for what, (data, model, phrase) in bad.items():
        with pytest.raises(UnsupportedInputError) as caught:
            toolkit.compress(data, codec="pc", model=model)
        message = str(caught.value)
        assert phrase in message and "\n" not in message, (what, message)
    with pytest.raises(ModelMismatchError):
        toolkit.compress(_npy(held), codec="pc", model=path + "-missing")
    with pytest.raises(ToolkitError):
        toolkit.compress(_npy(held), codec="pc", model=path, method="fast")


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_cli_refuses_text(tmp_path, capsys):
    from toolkit.cli import main

    (tmp_path / "notes.txt").write_text("hello\n" * 50)
    assert main(["compress", str(tmp_path / "notes.txt"), "--codec", "pc", "-q"]) == 2
    err = capsys.readouterr().err
    assert "PNG" in err and err.count("\n") == 1
    assert not (tmp_path / "notes.txt.tkz").exists()


def test_auto_never_picks_pc_for_text():
    assert toolkit.info(toolkit.compress(b"plain text, not an image " * 40))["header"]["codec"] != "pc"


def test_patch_model_save_load(patch_model):
    m = PatchModel.load(patch_model)
    assert set(m.circuits) == {1, 3} and m.patch == 4
    assert len(m.sha256()) == 64


def test_shipped_patch_model_round_trip_and_manifest():
    import json

    from toolkit.codecs.pc import DEFAULT_PATCH_MODEL

    entry = json.loads((DEFAULT_PATCH_MODEL.parent / "MANIFEST.json").read_text())["pc-patch"]
    assert PatchModel.load(DEFAULT_PATCH_MODEL).sha256() == entry["sha256"]
    for pixels in (_photo(19, 26, True, 4), _photo(30, 9, False, 5)):
        data = encode_png(pixels)
        blob = toolkit.compress(data, codec="pc")
        assert toolkit.info(blob)["header"]["model_sha256"] == entry["sha256"]
        assert toolkit.decompress(blob) == data


def test_pc_codec_imports_without_torch():
    # `codec list` imports every codec module and builds configs; none of that may load torch.
    code = ("import sys\n"
            "from toolkit.codecs.pc import PCCodec, PCConfig\n"
            "PCCodec(PCConfig(method='partial', batch=7))\n"
            "import toolkit.circuits, toolkit.formats\n"
            "print(toolkit.circuits.METHODS, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False", out


def test_file_over_one_chunk_gets_the_limit_message():
    # the whole file must be one chunk: a PNG over 64 MiB is refused as too large (not as a
    # damaged PNG, which is all its first chunk would look like) and before any parsing
    from toolkit.codecs.pc import PCCodec

    assert PCCodec.whole_file is True
    big = encode_png(np.zeros((4, 4), np.uint8)) + bytes(PCCodec.chunk_size)
    with pytest.raises(UnsupportedInputError, match="64 MiB"):
        toolkit.compress(big, codec="pc")


def test_notebook_states_the_shipped_patch_size():
    # notebook 11 once said 4x4 patches while the shipped model used 8x8
    import re
    from pathlib import Path

    import nbformat

    from toolkit.codecs.pc import DEFAULT_PATCH_MODEL

    patch = PatchModel.load(DEFAULT_PATCH_MODEL).patch
    nb = nbformat.read(Path(__file__).parents[2] / "notebooks" / "11_pc_lossless.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    stated = {int(a) for a, b in re.findall(r"(\d+)\s*x\s*(\d+) patch", text) if a == b}
    assert stated <= {patch}, f"notebook 11 states {sorted(stated)}x patches; the shipped model uses {patch}"


def test_pc_decoder_pointed_at_another_model_dir(tmp_path):
    """The pc codec finds its model through the store: a moved model decodes with --set model_dir=DIR."""
    import shutil

    import numpy as np

    import toolkit
    from toolkit.circuits import EMConfig, fit_hclt
    from toolkit.errors import ModelMismatchError

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(200, 6)).astype(np.uint8)
    circuit, _ = fit_hclt(x, EMConfig(epochs=2), num_latents=4, num_cats=4)
    where = tmp_path / "mine" / "circ"
    circuit.save(where)
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    blob = toolkit.compress(buf.getvalue(), codec="pc", model=str(where))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(where), moved / "circ")
    with pytest.raises(ModelMismatchError):
        toolkit.decompress(blob)
    assert toolkit.decompress(blob, model_dir=str(moved)) == buf.getvalue()
