"""Lossless image benchmark: probabilistic circuits (``--codec pc``) against PNG, WebP, JPEG XL and zstd.

One run, three parts, every figure from a verified exact round trip:

1. **digits** (scikit-learn's 8x8 digits, 17 grey levels): an HCLT trained on
   a seeded split, coded on the held-out records, in bits per dimension;
   the classic coders get the same held-out records as one mosaic image
   (PNG, WebP, JPEG XL) or raw bytes (zstd, xz).
2. **photos** no shipped model was trained on (``HELD_OUT_PHOTOS``): the pc
   codec with the shipped patch model on a PNG of each, decoded in a fresh
   process (``python -m toolkit decompress``), against optimized PNG, WebP
   lossless (``cwebp -lossless -z 9``), JPEG XL lossless (``cjxl -d 0 -e 9``)
   and zstd -19 on the raw pixels.
3. **speed** of the three coding methods (naive: a full marginal query per
   variable; partial: re-evaluate the variable's path to the root; context:
   the path without the K candidates) at D = 64 (digits) and D = 256 (16x16
   grey patches, K = 256).

    python benchmarks/lossless_images.py --out benchmarks/results/lossless_images.json
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from PIL import Image

import toolkit
from toolkit.bench import machine
from toolkit.circuits import (
    HELD_OUT_PHOTOS,
    TRAIN_PHOTOS,
    EMConfig,
    decode_records,
    encode_records,
    fit_hclt,
    image_to_records,
    load_photo,
    model_bits,
)


def png_optimized(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _tool(cmd: list[str], pixels: np.ndarray, suffix: str, decode: list[str]) -> int:
    """Size of ``cmd``'s output on a PNG of ``pixels``, after checking its decode is exact."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst, back = Path(tmp) / "in.png", Path(tmp) / f"out{suffix}", Path(tmp) / "back.png"
        src.write_bytes(png_optimized(pixels))
        subprocess.run([*cmd, str(src), "-o", str(dst)] if "cwebp" in cmd[0] else [*cmd, str(src), str(dst)],
                       check=True, capture_output=True)
        subprocess.run([*decode, str(dst), "-o", str(back)] if "dwebp" in decode[0] else [*decode, str(dst), str(back)],
                       check=True, capture_output=True)
        got = np.asarray(Image.open(back).convert("L" if pixels.ndim == 2 else "RGB"))
        if not np.array_equal(got, pixels):
            raise SystemExit(f"{cmd[0]} did not round-trip")
        return dst.stat().st_size


def classic_sizes(pixels: np.ndarray) -> dict[str, int]:
    raw = pixels.tobytes()
    out = {"png_optimized": len(png_optimized(pixels)),
           "zstd19_raw": len(zstandard.ZstdCompressor(level=19).compress(raw)),
           "xz9e_raw": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))}
    if shutil.which("cwebp"):
        out["webp_lossless_z9"] = _tool(["cwebp", "-quiet", "-lossless", "-z", "9"], pixels, ".webp", ["dwebp"])
    if shutil.which("cjxl"):
        out["jxl_lossless_e9"] = _tool(["cjxl", "--quiet", "-d", "0", "-e", "9"], pixels, ".jxl", ["djxl"])
    return out


def digits_part(latents: int, epochs: int, tmp: Path) -> dict:
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.uint8)  # [1797, 8, 8], values 0..16
    perm = np.random.default_rng(0).permutation(len(x))
    test, valid, train = x[perm[:360]], x[perm[360:540]], x[perm[540:]]
    t0 = time.perf_counter()
    circuit, hist = fit_hclt(train, EMConfig(epochs=epochs), num_latents=latents, num_cats=17, valid=valid)
    train_s = time.perf_counter() - t0
    path = tmp / "digits-circuit"
    circuit.save(path)
    buf = io.BytesIO()
    np.save(buf, test, allow_pickle=False)
    npy = buf.getvalue()
    blob = toolkit.compress(npy, codec="pc", model=str(path))
    assert toolkit.decompress(blob) == npy
    dims = test.size
    stream = encode_records(circuit, test.reshape(len(test), -1))
    # the held-out digits tiled 18 x 20 into one 144 x 160 image for the 2D coders
    mosaic = test.reshape(18, 20, 8, 8).transpose(0, 2, 1, 3).reshape(144, 160)
    sizes = classic_sizes(mosaic)
    rows = {k: 8 * v / dims for k, v in sizes.items()}
    rows["pc_stream"] = 8 * len(stream) / dims
    rows["pc_tkz_file"] = 8 * len(blob) / dims
    rows["pc_model_bits"] = model_bits(circuit, test.reshape(len(test), -1)) / dims
    return {"records": {"train": len(train), "valid": len(valid), "test": len(test)}, "D": 64, "K": 17,
            "latents": latents, "epochs": epochs, "train_s": train_s, "history": hist,
            "bits_per_dim": rows, "npy_bytes": len(npy), "tkz_bytes": len(blob), "circuit": circuit,
            "beats_all_classic": all(rows["pc_tkz_file"] < v for k, v in rows.items() if not k.startswith("pc"))}


def photo_part(names: list[str], tmp: Path) -> list[dict]:
    rows = []
    for name in names:
        px = load_photo(name)
        png = png_optimized(px)
        src, tkz, back = tmp / f"{name}.png", tmp / f"{name}.tkz", tmp / f"{name}.out.png"
        src.write_bytes(png)
        t0 = time.perf_counter()
        blob = toolkit.compress(png, codec="pc")
        t1 = time.perf_counter()
        tkz.write_bytes(blob)
        r = subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tkz), "-o", str(back), "-q", "-f"],
                           capture_output=True, text=True)
        t2 = time.perf_counter()
        if r.returncode != 0 or back.read_bytes() != png:
            raise SystemExit(f"pc did not round-trip {name}: {r.stderr}")
        dims = px.size
        sizes = classic_sizes(px)
        sizes["pc"] = len(blob)
        row = {"image": name, "shape": list(px.shape), "bytes": sizes,
               "bits_per_dim": {k: 8 * v / dims for k, v in sizes.items()},
               "pc_compress_s": t1 - t0, "pc_decompress_fresh_process_s": t2 - t1,
               "pc_vs_png": sizes["pc"] / sizes["png_optimized"]}
        if "jxl_lossless_e9" in sizes:
            row["pc_vs_jxl"] = sizes["pc"] / sizes["jxl_lossless_e9"]
        print(name, json.dumps({k: round(v, 3) for k, v in row["bits_per_dim"].items()}), flush=True)
        rows.append(row)
    return rows


def speed_part(digits_circuit, naive_records: int, records: int) -> list[dict]:
    from sklearn.datasets import load_digits

    out = []
    d64 = load_digits().images.astype(np.uint8).reshape(-1, 64)[:records]
    # D = 256: 16x16 patches of a training photo's MED residuals, K = 256.
    patches = image_to_records(load_photo(TRAIN_PHOTOS[0]), 16)  # 1,024 patches of 512 x 512
    c256, _ = fit_hclt(patches[:768], EMConfig(epochs=2), num_latents=16, num_cats=256)
    for d, circuit, data in ((64, digits_circuit, d64), (256, c256, patches[768 : 768 + records])):
        # naive at its own (small) count and every method at that same count, so batching
        # does not flatter partial evaluation; then partial and context on the full batch.
        runs = [(m, naive_records) for m in ("naive", "partial", "context")]
        runs += [(m, len(data)) for m in ("partial", "context")]
        for method, n in runs:
            x = data[:n]
            t0 = time.perf_counter()
            s = encode_records(circuit, x, batch_size=n, method=method)
            t1 = time.perf_counter()
            row = {"D": d, "K": circuit.num_cats, "latents": circuit.num_latents, "method": method,
                   "records": n, "encode_pixels_per_s": x.size / (t1 - t0), "decode_pixels_per_s": None,
                   "bits_per_dim": 8 * len(s) / x.size}
            if method != "naive" or d == 64:  # naive decoding at D = 256 is the same minutes again
                y = decode_records(circuit, s, n)
                row["decode_pixels_per_s"] = x.size / (time.perf_counter() - t1)
                assert np.array_equal(y, x)
            out.append(row)
            print(row, flush=True)
    for d in (64, 256):
        naive = next(r for r in out if r["D"] == d and r["method"] == "naive")
        for r in out:
            if r["D"] == d:
                r["encode_speedup_vs_naive"] = r["encode_pixels_per_s"] / naive["encode_pixels_per_s"]
    return out


def markdown(res: dict) -> str:
    lines = ["# Lossless images: probabilistic circuits against classic codecs", "",
             f"Machine: {res['machine']['cores']} cores, torch {res['machine']['torch']}, "
             f"{res['machine']['threads']} thread(s). Bits per dimension (sub-pixel); lower is better.", "",
             "## Digits (held-out records, D = 64, K = 17)", "", "| coder | bits/dim |", "|---|---|"]
    for k, v in res["digits"]["bits_per_dim"].items():
        lines.append(f"| {k} | {v:.3f} |")
    cols = ["pc", "png_optimized", "webp_lossless_z9", "jxl_lossless_e9", "zstd19_raw"]
    lines += ["", "## Photos no model was trained on", "",
              "| image | " + " | ".join(cols) + " | pc / PNG | pc / JXL |", "|---" * (len(cols) + 3) + "|"]
    for r in res["photos"]:
        b = r["bits_per_dim"]
        lines.append(f"| {r['image']} {'x'.join(map(str, r['shape']))} | "
                     + " | ".join(f"{b[c]:.3f}" if c in b else "-" for c in cols)
                     + f" | {r['pc_vs_png']:.3f} | {r.get('pc_vs_jxl', float('nan')):.3f} |")
    lines += ["", "## Coding speed (one thread)", "",
              "| D | K | method | records | encode px/s | decode px/s | speed-up vs naive |",
              "|---|---|---|---|---|---|---|"]
    for r in res["speed"]:
        dec = "-" if r["decode_pixels_per_s"] is None else f"{r['decode_pixels_per_s']:.0f}"
        lines.append(f"| {r['D']} | {r['K']} | {r['method']} | {r['records']} | {r['encode_pixels_per_s']:.0f} | "
                     f"{dec} | {r['encode_speedup_vs_naive']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lossless_images.json")
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--photos", nargs="*", default=list(HELD_OUT_PHOTOS))
    ap.add_argument("--speed-records", type=int, default=128)
    ap.add_argument("--naive-records", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        digits = digits_part(args.latents, args.epochs, tmp)
        print("digits", json.dumps(digits["bits_per_dim"]), flush=True)
        photos = photo_part(args.photos, tmp)
        speed = speed_part(digits.pop("circuit"), args.naive_records, args.speed_records)
    res = {"machine": machine(), "digits": digits, "photos": photos, "speed": speed,
           "patch_model_trained_on": list(TRAIN_PHOTOS),
           "command": "python benchmarks/lossless_images.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
