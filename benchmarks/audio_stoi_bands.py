"""Where the audio codec loses intelligibility: STOI split by band, and magnitude against phase.

    python benchmarks/audio_stoi_bands.py --eval-dir runs/audio/eval

On held-out recorded speech (the same 2 minutes as ``benchmarks/audio_codec.py``: 30-second files,
speakers in turn), decoded by this project's codec at ``--kbps`` and by Opus at 6 kbps:

- STOI per one-third-octave band. STOI is the mean over 15 bands (150 Hz to 4.3 kHz) of how well
  each band's short-time envelope (384 ms segments) follows the original's, so the per-band figures
  average to the STOI that pystoi reports (checked on every file).
- STOI of two hybrids made in a 512-point STFT (32 ms): the decoded magnitudes with the original
  phases, and the original magnitudes with the decoded phases. The first shows what the decoder's
  magnitudes cost on their own, the second what its phases cost.

Output: ``benchmarks/results/audio_stoi_bands.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from audio_codec import SR, joined_files, run_opus, run_ours  # noqa: E402 - the sibling benchmark's data and runners


def stoi_by_band(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """STOI's intermediate correlations averaged per band (their mean is STOI).

    pystoi returns only the mean; these are its own steps (its resampling, silent-frame removal,
    STFT, one-third-octave matrix, normalisation and clipping), stopped one sum earlier.
    """
    from pystoi import utils

    m = importlib.import_module("pystoi.stoi")  # the module behind the function pystoi exports
    x = utils.resample_oct(x, m.FS, SR)
    y = utils.resample_oct(y, m.FS, SR)
    x, y = utils.remove_silent_frames(x, y, m.DYN_RANGE, m.N_FRAME, m.N_FRAME // 2)
    bands = []
    for s in (x, y):
        spec = utils.stft(s, m.N_FRAME, m.NFFT, overlap=2).transpose()
        tob = np.sqrt(m.OBM @ np.square(np.abs(spec)))
        bands.append(np.stack([tob[:, t - m.N:t] for t in range(m.N, tob.shape[1] + 1)]))
    xs, ys = bands
    ys = ys * np.linalg.norm(xs, axis=2, keepdims=True) / (np.linalg.norm(ys, axis=2, keepdims=True) + utils.EPS)
    ys = np.minimum(ys, xs * (1 + 10 ** (-m.BETA / 20)))
    xs, ys = xs - xs.mean(2, keepdims=True), ys - ys.mean(2, keepdims=True)
    xs /= np.linalg.norm(xs, axis=2, keepdims=True) + utils.EPS
    ys /= np.linalg.norm(ys, axis=2, keepdims=True) + utils.EPS
    return (xs * ys).sum(2).mean(0)


def hybrids(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decoded magnitude + original phase, original magnitude + decoded phase), as waveforms."""
    win = torch.hann_window(512, dtype=torch.float64)
    spec = [torch.stft(torch.from_numpy(s).double(), 512, 128, window=win, return_complex=True) for s in (x, y)]

    def back(mag, phase):
        return torch.istft(mag * torch.exp(1j * phase), 512, 128, window=win, length=x.size).numpy()

    return back(spec[1].abs(), spec[0].angle()), back(spec[0].abs(), spec[1].angle())


def main(argv: list[str] | None = None) -> int:
    from pystoi import stoi

    from toolkit.audio.codec import load_codec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", type=Path, required=True,
                    help="runs/audio/eval from python -m toolkit.recipes.build_audio_data")
    ap.add_argument("--model", default="", help="a model name or exported directory (default: the shipped one)")
    ap.add_argument("--kbps", type=float, default=6.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/audio_stoi_bands"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from pystoi.utils import thirdoct

    centres = thirdoct(10000, 512, 15, 150)[1]
    used: dict[str, float] = {}
    files = joined_files(args.eval_dir / "speech_recorded", 30.0, args.files, used)
    systems = {f"ours {args.kbps:g} kbps": lambda x: run_ours(x, args.kbps, args.model)[0],
               "Opus 6 kbps": lambda x: run_opus(x, 6)[0]}
    result = {"model": args.model or "audio-16k", "model_sha256": load_codec(args.model or "audio-16k").sha256,
              "data": {k: round(v, 1) for k, v in sorted(used.items())}, "band_hz": [round(float(c)) for c in centres],
              "systems": {}}
    for name, run in systems.items():
        per_band, whole, mag_only, phase_only = [], [], [], []
        for x in files:
            y = run(x)
            bands = stoi_by_band(x, y)
            whole.append(stoi(x, y, SR))
            assert abs(bands.mean() - whole[-1]) < 1e-6, (bands.mean(), whole[-1])
            per_band.append(bands)
            a, b = hybrids(x, y)
            mag_only.append(stoi(x, a, SR))
            phase_only.append(stoi(x, b, SR))
        result["systems"][name] = {"stoi": float(np.mean(whole)), "by_band": np.mean(per_band, 0).round(4).tolist(),
                                   "decoded_magnitude_original_phase": float(np.mean(mag_only)),
                                   "original_magnitude_decoded_phase": float(np.mean(phase_only))}
        print(name, json.dumps(result["systems"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"Model {result['model']} ({result['model_sha256'][:12]}); held-out recorded speech, seconds per "
             f"source: {', '.join(f'{k} {v:g}' for k, v in result['data'].items())}.", "",
             "| system | STOI | decoded magnitude, original phase | original magnitude, decoded phase |",
             "|---|---:|---:|---:|"]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | {s['stoi']:.3f} | {s['decoded_magnitude_original_phase']:.3f} "
                     f"| {s['original_magnitude_decoded_phase']:.3f} |")
    lines += ["", "STOI by one-third-octave band (centre Hz):", "",
              "| system | " + " | ".join(str(c) for c in result["band_hz"]) + " |",
              "|---|" + "---:|" * len(result["band_hz"])]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in s["by_band"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, s in result["systems"].items():
        ax.semilogx(result["band_hz"], s["by_band"], "o-", label=f"{name} (STOI {s['stoi']:.3f})")
    ax.set_xlabel("one-third-octave band centre (Hz)")
    ax.set_ylabel("envelope correlation")
    ax.set_title("STOI by band, held-out recorded speech")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
