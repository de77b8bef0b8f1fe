"""Lossless weight coding against the tools people use on checkpoints, in one run.

    python benchmarks/lossless_weights.py --out benchmarks/results/lossless_weights.json

Checkpoints (safetensors files built from this project's shipped models, no
network):

* trained: ``lm-default`` and ``lm-long`` (Llama-class LMs, 4.3M weights,
  trained in float32) and ``vlm-scenes`` (a LLaVA-class model, 5.0M
  weights, shipped in float16), each cast to BF16 and in its own dtype;
* ``pc-patch/c3``: a probabilistic circuit's log-probabilities (1.8M,
  float32; a table of values unlike a network's weights), as shipped and in
  BF16;
* random: the transformers architectures freshly initialised
  (``from_config``), in BF16.

Coders, each timed on the whole file (best of ``--repeats``, ``--threads``
threads where the coder uses them):

* ``weights fast`` and ``weights max``: this project's codec (through
  ``toolkit.compress`` / ``toolkit.decompress``, container and checksums
  included); every .tkz is also decoded in a fresh process and compared;
* ``zstd -19`` and ``xz -9`` on the file;
* ``byte-split zstd -19``: every float tensor split into byte planes (byte 0
  of each value, byte 1, ...), each plane zstd -19: ZipNN's idea without its
  Huffman stage;
* ``ZipNN`` (the ``zipnn`` package from PyPI), per tensor; its output is
  decoded and compared, and a coder that does not give back its input is
  reported as not lossless;
* the order-0 entropy of each byte plane of the float tensors (other bytes
  counted raw): the floor of any per-plane coder.

Sizes are percent of the original file. DFloat11's own format needs CUDA
(its package decodes with a CUDA kernel only), so its published ratio is
quoted in the README, not measured here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import lzma
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _checkpoints(names: list[str]) -> list[tuple[str, str, bytes]]:
    """(name, kind, safetensors bytes) for each model: trained as shipped, trained in BF16, random in BF16."""
    from safetensors.torch import load, load_file, save
    from transformers import AutoConfig, AutoModel

    from toolkit.models import locate

    out = []
    for name in names:
        if "/" in name:  # a shipped safetensors file that is not a transformers model (pc-patch/c3)
            model, part = name.split("/", 1)
            raw = (Path(locate(model).path) / part / "circuit.safetensors").read_bytes()
            sd = load(raw)
            out.append((f"{name} (F32)", "trained", raw))
            out.append((f"{name} (BF16)", "trained", save({k: v.to(torch.bfloat16) for k, v in sd.items()})))
            continue
        path = Path(locate(name).path)
        sd = load_file(path / "model.safetensors")
        dtype = next(iter(sd.values())).dtype
        tag = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
        out.append((f"{name} ({tag})", "trained", (path / "model.safetensors").read_bytes()))
        out.append((f"{name} (BF16)", "trained", save({k: v.to(torch.bfloat16) for k, v in sd.items()})))
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_config(config)
        rand = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                if k in sd or any(k.endswith(s) for s in (".weight", ".bias"))}
        out.append((f"{name} random init (BF16)", "random", save(rand)))
    return out


def _timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return result, best


def _tensors(data: bytes):
    from toolkit.weights.checkpoint import parse_header

    header = parse_header(data, len(data))
    return header, [(t, data[t.begin:t.end]) for t in header.tensors]


def _bound(data: bytes) -> float:
    from toolkit.weights.coding import plane_entropy
    from toolkit.weights.planes import layout_for

    header, tensors = _tensors(data)
    bits = 8 * header.size
    for t, raw in tensors:
        if t.dtype in ("BF16", "F16", "F32", "F64") and t.numel:
            bits += sum(plane_entropy(np.frombuffer(raw, dtype=np.uint8), layout_for(t.dtype))) * t.numel
        else:
            bits += 8 * len(raw)
    return bits / 8


def _byte_split(data: bytes, level: int = 19):
    """Byte planes of every float tensor zstd-coded; other bytes zstd-coded whole."""
    header, tensors = _tensors(data)
    cctx = zstandard.ZstdCompressor(level=level)
    parts = [cctx.compress(data[:header.size])]
    for t, raw in tensors:
        item = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}.get(t.dtype)
        if item and t.numel:
            b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, item)
            parts += [cctx.compress(np.ascontiguousarray(b[:, i]).tobytes()) for i in range(item)]
        else:
            parts.append(cctx.compress(raw))
    return parts


def _byte_split_decode(parts, data_layout) -> bytes:
    dctx = zstandard.ZstdDecompressor()
    header, tensors = data_layout
    out = bytearray(dctx.decompress(parts[0]))
    k = 1
    for t, raw in tensors:
        item = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}.get(t.dtype)
        if item and t.numel:
            b = np.empty((t.numel, item), dtype=np.uint8)
            for i in range(item):
                b[:, i] = np.frombuffer(dctx.decompress(parts[k]), dtype=np.uint8)
                k += 1
            out += b.tobytes()
        else:
            out += dctx.decompress(parts[k], max_output_size=len(raw))
            k += 1
    return bytes(out)


def _zipnn(data: bytes, threads: int, repeats: int) -> dict:
    import zipnn

    header, tensors = _tensors(data)
    coders = {d: zipnn.ZipNN(bytearray_dtype=z, input_format="byte", threads=threads) for d, z in ZIPNN_DTYPES.items()}
    plain = zstandard.ZstdCompressor(level=3)

    def enc():
        out = []
        for t, raw in tensors:
            if t.dtype in coders and t.numel >= 64:
                # ZipNN's compress reorders the bits of the buffer it is given in place: give it a copy
                out.append((t.dtype, bytes(coders[t.dtype].compress(bytearray(raw)))))
            else:
                out.append((None, plain.compress(raw)))
        return out

    def dec(coded):
        res = []
        for (dtype, c), (_, raw) in zip(coded, tensors, strict=True):
            res.append(bytes(coders[dtype].decompress(c)) if dtype else
                       zstandard.ZstdDecompressor().decompress(c, max_output_size=len(raw)))
        return res

    coded, te = _timed(enc, repeats)
    back, td = _timed(lambda: dec(coded), repeats)
    exact = all(b == raw for b, (_, raw) in zip(back, tensors, strict=True))
    size = header.size + sum(len(c) for _, c in coded)
    return {"bytes": size, "compress_s": te, "decompress_s": td, "lossless": exact,
            "version": importlib.metadata.version("zipnn")}


def _fresh_process_check(blob: bytes, digest: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "f.tkz"
        src.write_bytes(blob)
        code = ("import hashlib,sys,toolkit;"
                "print(hashlib.sha256(toolkit.decompress(open(sys.argv[1],'rb').read())).hexdigest())")
        out = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, check=True)
        return out.stdout.strip() == digest


def _codec_decode_s(data: bytes, level: str, repeats: int) -> float:
    """Seconds the weights codec's decoder takes over the file's chunk payloads, in the container's
    batches but without its framing, CRCs and SHA-256 (what the rivals' figures leave out as well)."""
    from toolkit.codecs.weights import WeightsCodec, WeightsConfig

    codec = WeightsCodec(WeightsConfig(level=level))
    size, batch = codec.chunk_size, codec.batch_chunks
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    enc = codec.open_encoder()
    payloads = [p for i in range(0, len(chunks), batch) for p in enc.encode_chunks(chunks[i:i + batch])]
    enc.finish()
    sizes = [len(c) for c in chunks]

    def dec():
        d = codec.open_decoder()
        return [bytes(x) for i in range(0, len(chunks), batch)
                for x in d.decode_chunks(payloads[i:i + batch], sizes[i:i + batch], [None] * len(sizes[i:i + batch]))]

    back, seconds = _timed(dec, repeats)
    if b"".join(back) != data:
        raise AssertionError(f"weights {level}: the codec's chunks do not decode to the file")
    return seconds


def _measure(name: str, kind: str, data: bytes, args) -> dict:
    import toolkit

    mb = len(data) / 1e6
    digest = hashlib.sha256(data).hexdigest()
    row = {"checkpoint": name, "kind": kind, "bytes": len(data), "sha256": digest[:16],
           "bound": _bound(data) / len(data), "coders": {}}

    def put(coder, size, te, td, lossless, **extra):
        row["coders"][coder] = {"ratio": size / len(data), "compress_mb_s": mb / te, "decompress_mb_s": mb / td,
                                "lossless": lossless, **extra}

    for level in ("fast", "max"):
        toolkit.decompress(toolkit.compress(data, codec="weights", level=level))  # compiles the loops once
        blob, te = _timed(lambda level=level: toolkit.compress(data, codec="weights", level=level), 1)
        back, td = _timed(lambda blob=blob: toolkit.decompress(blob), args.repeats)
        put(f"weights {level}", len(blob), te, td, back == data and _fresh_process_check(blob, digest),
            codec_decompress_mb_s=mb / _codec_decode_s(data, level, args.repeats))
    stored = toolkit.compress(data, codec="store")
    _, td = _timed(lambda: toolkit.decompress(stored), args.repeats)
    row["container_floor_mb_s"] = mb / td  # the store codec: framing, CRCs and SHA-256 alone
    z, te = _timed(lambda: zstandard.ZstdCompressor(level=19, threads=args.threads).compress(data), 1)
    back, td = _timed(lambda: zstandard.ZstdDecompressor().decompress(z), args.repeats)
    put("zstd -19", len(z), te, td, back == data)
    if not args.no_xz:
        x, te = _timed(lambda: lzma.compress(data, preset=9), 1)
        back, td = _timed(lambda: lzma.decompress(x), args.repeats)
        put("xz -9", len(x), te, td, back == data)
    layout = _tensors(data)
    parts, te = _timed(lambda: _byte_split(data), 1)
    back, td = _timed(lambda: _byte_split_decode(parts, layout), args.repeats)
    put("byte-split zstd -19", sum(len(p) for p in parts), te, td, back == data)
    try:
        zr = _zipnn(data, args.threads, args.repeats)
        put("ZipNN", zr["bytes"], zr["compress_s"], zr["decompress_s"], zr["lossless"], version=zr["version"])
    except ImportError:
        row["coders"]["ZipNN"] = {"missing": "pip install zipnn"}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lm-default,lm-long,vlm-scenes,pc-patch/c3")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lossless_weights.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-xz", action="store_true", help="skip xz -9 (the slowest rival)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from toolkit.bench import machine

    rows = []
    for name, kind, data in _checkpoints(args.models.split(",")):
        row = _measure(name, kind, data, args)
        rows.append(row)
        print(f"{name:>34}: bound {row['bound']:.2%} " + " ".join(
            f"{k} {v['ratio']:.2%}{'' if v.get('lossless', True) else '(NOT LOSSLESS)'}"
            for k, v in row["coders"].items() if "ratio" in v), flush=True)

    result = {"benchmark": "lossless_weights", "machine": machine(), "threads": args.threads,
              "command": "python benchmarks/lossless_weights.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def _table(res: dict) -> str:
    m = res["machine"]
    coders = list(res["rows"][0]["coders"])
    lines = [f"`{res['command']}`: {m['cores']} cores, torch {m['torch']}, {res['threads']} threads. Size as % of "
             "the file (smaller is better); the bound is the order-0 entropy of the float tensors' byte planes.", "",
             "| checkpoint | bound | " + " | ".join(coders) + " |", "|---|---:|" + "---:|" * len(coders)]
    for r in res["rows"]:
        cells = []
        for c in coders:
            v = r["coders"].get(c, {})
            if "ratio" not in v:
                cells.append("n/a")
                continue
            cells.append(f"{v['ratio']:.2%}" + ("" if v["lossless"] else " (not lossless)"))
        lines.append(f"| {r['checkpoint']} | {r['bound']:.2%} | " + " | ".join(cells) + " |")
    lines += ["", "Speed, MB/s of the original file (compress / decompress). The weights codec's decompress is the "
              "whole .tkz file (framing, CRCs, SHA-256); *codec only* is its decoder over the chunk payloads, as "
              "the rivals are timed; *store* is the container alone (no coding) on the same file.", "",
              "| checkpoint | weights fast (codec only) | weights max (codec only) | store |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        f, x = r["coders"]["weights fast"], r["coders"]["weights max"]
        lines.append(f"| {r['checkpoint']} | {f['decompress_mb_s']:.0f} ({f['codec_decompress_mb_s']:.0f}) | "
                     f"{x['decompress_mb_s']:.0f} ({x['codec_decompress_mb_s']:.0f}) | "
                     f"{r['container_floor_mb_s']:.0f} |")
    lines += ["", "All coders:", "",
              "| checkpoint | " + " | ".join(coders) + " |", "|---|" + "---:|" * len(coders)]
    for r in res["rows"]:
        cells = [f"{v['compress_mb_s']:.0f} / {v['decompress_mb_s']:.0f}" if "ratio" in v else "n/a"
                 for v in (r["coders"].get(c, {}) for c in coders)]
        lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
