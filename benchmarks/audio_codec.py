"""The audio codec against Opus at matched bitrates, on held-out speech and music, in one run.

    python -m toolkit.recipes.build_audio_data --out runs/audio   # builds runs/audio/eval too
    python benchmarks/audio_codec.py --eval-dir runs/audio/eval

For each held-out set (``speech_recorded``: recorded voices; ``speech_unseen_voice``:
synthetic voices no model here heard; ``music``) the clips are joined, 0.25 s of silence
apart, into files of about 30 seconds, taking each speaker or source in turn so that the first
minutes of a set cover all of them. Every file goes through

- this project's ``audio`` codec (the ``.tkz`` file, header included) at each of its
  bitrates from 1.5 to 12 kbps;
- Opus through soundfile (libsndfile's Ogg/Opus, libopus inside; the Ogg file on disk) at
  6, 8, 12 and 16 kbps targets (libopus goes no lower than 6). libsndfile sets the bitrate
  from a compression level: ``6 + 250 * (1 - level)`` kbps.

Bitrate is bits on disk over duration. Quality against the 16 kHz original: the
multi-scale log-mel distance (:func:`toolkit.audio.mel_distance`, lower is better),
SI-SDR, STOI (pystoi), wide-band PESQ (speech) and ViSQOL in speech mode (speech; when
``visqol-python`` is installed). Real-time factors are the codec's own encode and decode
time over audio time on ``--threads`` torch threads. Output:
``benchmarks/results/audio_codec.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
SETS = ("speech_recorded", "speech_unseen_voice", "music")
OPUS_KBPS = (6, 8, 12, 16)


def source_of(name: str) -> str:
    """The speaker or kind of a held-out clip, from the names ``toolkit.recipes.build_audio_data`` gives them:
    ``asterisk-allison``, ``ktuberling-de``, ``espeak-en-us+f5``, ``festival-slt``, ``alsa``, ``midi``,
    ``sonic-pi``."""
    parts = name.split("-")
    if parts[0] == "espeak":
        return "-".join(parts[:3])
    return "-".join(parts[:2]) if len(parts) > 2 else parts[0]


def interleaved(folder: Path) -> list[Path]:
    """The folder's clips taking each source in turn (each source's clips in name order), so that the
    first minutes of a set cover all of its speakers."""
    by_source: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*.flac")):
        by_source.setdefault(source_of(p.stem), []).append(p)
    queues = list(by_source.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def joined_files(folder: Path, seconds: float, count: int, used: dict[str, float]) -> list[np.ndarray]:
    """The folder's clips, sources in turn, joined into ``count`` files of about ``seconds`` each;
    ``used`` gets the seconds taken from each source."""
    gap = np.zeros(SR // 4, np.float32)
    out, cur, n = [], [], 0
    for p in interleaved(folder):
        x, sr = sf.read(p, dtype="float32")
        assert sr == SR, p
        used[source_of(p.stem)] = used.get(source_of(p.stem), 0.0) + x.size / SR
        cur += [x, gap]
        n += x.size + gap.size
        if n >= seconds * SR:
            out.append(np.concatenate(cur))
            cur, n = [], 0
            if len(out) == count:
                break
    if cur and len(out) < count:
        out.append(np.concatenate(cur))
    return out


def metrics(ref: np.ndarray, deg: np.ndarray, speech: bool, visqol_api) -> dict:
    import torch
    from pystoi import stoi

    from toolkit.audio import mel_distance, si_sdr

    n = min(ref.size, deg.size)
    ref, deg = ref[:n], deg[:n]
    out = {"mel": mel_distance(torch.from_numpy(deg), torch.from_numpy(ref)),
           "si_sdr": si_sdr(torch.from_numpy(deg), torch.from_numpy(ref)),
           "stoi": float(stoi(ref, deg, SR, extended=False))}
    if speech:
        from pesq import PesqError, pesq

        score = pesq(SR, ref, deg, "wb", on_error=PesqError.RETURN_VALUES)
        out["pesq"] = float(score) if score > 0 else None
        if visqol_api is not None:
            with tempfile.TemporaryDirectory() as d:
                sf.write(f"{d}/r.wav", ref, SR, subtype="PCM_16")
                sf.write(f"{d}/d.wav", deg, SR, subtype="PCM_16")
                out["visqol"] = float(visqol_api.measure(f"{d}/r.wav", f"{d}/d.wav").moslqo)
    return out


def run_ours(x: np.ndarray, kbps: float, model: str) -> tuple[np.ndarray, int, float, float]:
    import toolkit

    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="PCM_16")
    settings = {"kbps": kbps} | ({"model": model} if model else {})
    t = time.perf_counter()
    blob = toolkit.compress(buf.getvalue(), codec="audio", **settings)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    wav = toolkit.decompress(blob)
    t_dec = time.perf_counter() - t
    y, sr = sf.read(io.BytesIO(wav), dtype="float32")
    assert sr == SR and y.size == x.size
    return y, len(blob), t_enc, t_dec


def run_opus(x: np.ndarray, kbps: int) -> tuple[np.ndarray, int, float, float]:
    buf = io.BytesIO()
    t = time.perf_counter()
    sf.write(buf, x, SR, format="OGG", subtype="OPUS", compression_level=1 - (kbps - 6) / 250)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    y, sr = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
    t_dec = time.perf_counter() - t
    assert sr == SR
    return y, len(buf.getvalue()), t_enc, t_dec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", type=Path, default=Path("runs/audio/eval"))
    ap.add_argument("--model", default="", help="a model directory; default: the shipped audio-16k")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each joined test file")
    ap.add_argument("--files", type=int, default=4, help="test files per set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audio_codec")
    args = ap.parse_args(argv)
    os.environ.setdefault("LOGURU_LEVEL", "ERROR")
    import torch

    from toolkit.audio import load_codec

    torch.set_num_threads(args.threads)
    codec = load_codec(args.model or "audio-16k")
    try:
        from visqol.api import VisqolApi

        visqol_api = VisqolApi()
        visqol_api.create(mode="speech", use_lattice_model=False)
    except Exception as e:  # noqa: BLE001 - optional metric: any failure to set it up means it is left out
        print(f"ViSQOL left out: {e}")
        visqol_api = None
    rows, covered = [], {}
    for name in SETS:
        covered[name] = {}
        files = joined_files(args.eval_dir / name, args.seconds, args.files, covered[name])
        seconds = sum(x.size for x in files) / SR
        print(f"{name}: {len(files)} files, {seconds:.0f} s", flush=True)
        systems = [("ours", kb) for kb in codec.bitrates if kb in (1.5, 3.0, 6.0, 12.0)]
        systems += [("opus", kb) for kb in OPUS_KBPS]
        for system, kb in systems:
            per, size, t_enc, t_dec = [], 0, 0.0, 0.0
            for x in files:
                y, n, te, td = run_ours(x, kb, args.model) if system == "ours" else run_opus(x, int(kb))
                per.append(metrics(x, y, name != "music", visqol_api))
                size, t_enc, t_dec = size + n, t_enc + te, t_dec + td
            row = {"set": name, "system": system, "nominal_kbps": kb, "kbps_on_disk": 8 * size / seconds / 1000,
                   "encode_rtf": seconds / t_enc, "decode_rtf": seconds / t_dec, "seconds": seconds}
            for k in per[0]:
                vals = [p[k] for p in per if p.get(k) is not None]
                row[k] = float(np.mean(vals)) if vals else None
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    machine = {"cpu_threads": args.threads, "cores": os.cpu_count(), "torch": torch.__version__,
               "platform": platform.platform(), "opus": f"libsndfile {sf.__libsndfile_version__} Ogg/Opus"}
    result = {"machine": machine, "model": args.model or "audio-16k", "model_sha256": codec.sha256,
              "data": {s: {src: round(t, 1) for src, t in sorted(c.items())} for s, c in covered.items()},
              "rows": rows, "targets": targets(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


def targets(rows: list[dict]) -> dict:
    """The issue's targets on recorded speech, each with the figures it compares."""
    rec = {(r["system"], r["nominal_kbps"]): r for r in rows if r["set"] == "speech_recorded"}
    opus6, out = rec.get(("opus", 6)), {}
    for kb in (1.5, 3.0, 6.0):
        ours = rec.get(("ours", kb))
        if ours and opus6:
            out[f"{kb:g} kbps beats Opus 6 kbps (STOI and mel)"] = {
                "met": ours["stoi"] > opus6["stoi"] and ours["mel"] < opus6["mel"],
                "ours": {"stoi": ours["stoi"], "mel": ours["mel"]},
                "opus": {"stoi": opus6["stoi"], "mel": opus6["mel"]}}
    if rec.get(("ours", 3.0)) and opus6:
        gap = opus6["stoi"] - rec[("ours", 3.0)]["stoi"]
        out["3 kbps STOI within 0.02 of Opus 6 kbps"] = {"met": gap <= 0.02, "gap": gap}
    ours_rows = [r for r in rows if r["system"] == "ours"]
    if ours_rows:
        out["encode and decode at least 20x real time"] = {
            "met": min(min(r["encode_rtf"], r["decode_rtf"]) for r in ours_rows) >= 20,
            "slowest_encode": min(r["encode_rtf"] for r in ours_rows),
            "slowest_decode": min(r["decode_rtf"] for r in ours_rows)}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cores']} cores, {m['cpu_threads']} torch threads, torch {m['torch']}, {m['opus']}.", ""]
    lines += [f"- {s} (seconds per source): {', '.join(f'{k} {v:g}' for k, v in src.items())}"
              for s, src in result["data"].items()]
    lines += ["",
             "| set | system | nominal kbps | kbps on disk | mel dist | SI-SDR dB | STOI | PESQ-wb | ViSQOL | "
             "enc x RT | dec x RT |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    for r in result["rows"]:
        lines.append(f"| {r['set']} | {r['system']} | {r['nominal_kbps']:g} | {r['kbps_on_disk']:.2f} | {f(r['mel'])} "
                     f"| {f(r['si_sdr'], 1)} | {f(r['stoi'])} | {f(r.get('pesq'), 2)} | {f(r.get('visqol'), 2)} "
                     f"| {r['encode_rtf']:.0f} | {r['decode_rtf']:.0f} |")
    lines += ["", "Targets (recorded speech):", ""]
    for k, v in result["targets"].items():
        lines.append(f"- {k}: {'met' if v['met'] else 'NOT met'} "
                     f"({json.dumps({a: b for a, b in v.items() if a != 'met'}, default=lambda x: round(x, 3))})")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SETS), figsize=(5 * len(SETS), 7), squeeze=False)
    for j, name in enumerate(SETS):
        for i, metric in enumerate(("stoi", "mel")):
            ax = axes[i][j]
            for system, style in (("ours", "o-"), ("opus", "s--")):
                pts = sorted((r["kbps_on_disk"], r[metric]) for r in rows if r["set"] == name and r["system"] == system)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label="toolkit audio" if system == "ours" else "Opus")
            what = "STOI (higher is better)" if metric == "stoi" else "mel distance (lower is better)"
            ax.set_title(f"{name}: {what}")
            ax.set_xlabel("kbps on disk")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
