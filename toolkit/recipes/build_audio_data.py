"""Build the audio codec's training and evaluation material offline, from Debian packages.

    python -m toolkit.recipes.build_audio_data --out runs/audio

writes, at 16 kHz mono:

- ``train.npy`` / ``train.json`` and ``valid.npy`` / ``valid.json``: splits
  that training reads (:mod:`toolkit.data.audio`);
- ``eval/<set>/*.flac``: the held-out material the benchmark reads, in three
  sets that no shipped model was trained on:

  * ``speech_recorded``: recorded (not synthesized) voices: the Asterisk
    prompts of Allison (en_US; her es_MX prompts are left out of training
    too), ktuberling's English, German and Slovenian words, and the ALSA
    channel-test announcements;
  * ``speech_unseen_voice``: festival's HTS voice ``cmu_us_slt_arctic_hts``
    and the espeak-ng variants ``m7``, ``f5`` and ``croak``, none of them used
    in training;
  * ``music``: one sonic-pi sample in five (chosen by a hash of its name) and
    MIDI rendered with seeds and General MIDI programs apart from training's.

Training material: espeak-ng speaking many languages with the other variants
at random rates and pitches; the festival diphone, HTS and cluster voices
(English, Catalan, Czech, Finnish, Italian, Russian); recorded Asterisk
prompts in Canadian French, Italian and Russian; ktuberling's recorded words
in the other languages; sonic-pi samples; and generated MIDI rendered with
fluidsynth through the FluidR3 General MIDI soundfont. ``sources.json``
records each package's version. Everything is seeded, so a rebuild from the
same package versions gives the same clips.

Sentences come from the licence texts in ``/usr/share/common-licenses``, which
every Debian system has: the words do not matter to a codec, the voices do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.audio.io import resample
from toolkit.config import Config, check
from toolkit.data.audio import SAMPLE_RATE, write_split
from toolkit.errors import DependencyError
from toolkit.recipes.common import cli

__all__ = ["BuildAudioDataConfig", "build", "main", "midi_file", "read_audio", "run"]

logger = logging.getLogger(__name__)

PACKAGES = ("espeak-ng", "festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts",
            "festvox-ca-ona-hts", "festvox-italp16k", "festvox-itapc16k", "festvox-czech-dita",
            "festvox-czech-krb", "festvox-ru", "festvox-suopuhe-lj", "festvox-suopuhe-mv",
            "asterisk-core-sounds-en-g722", "asterisk-core-sounds-es-g722", "asterisk-core-sounds-fr-g722",
            "asterisk-core-sounds-it-g722", "asterisk-core-sounds-ru-g722", "ktuberling-data", "alsa-utils",
            "sonic-pi-samples", "fluidsynth", "fluid-soundfont-gm", "ffmpeg")

ESPEAK_HELD_OUT = ("m7", "f5", "croak")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3",
                   "whisper", "Andy", "Annie", "Denis", "Gene", "Lee", "Mario", "Michael", "belinda", "david",
                   "edward", "linda", "paul", "robert", "steph", "travis", "victor")
ESPEAK_LANGS = ("en-us", "en-gb", "en-gb-scotland", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "ru", "hi",
                "cmn", "ja", "tr", "el", "fi")
FESTIVAL_TRAIN = ("kal_diphone", "ked_diphone", "upc_ca_ona_hts", "czech_dita", "czech_krb", "lp_diphone",
                  "pc_diphone", "msu_ru_nsh_clunits", "suo_fi_lj_diphone", "hy_fi_mv_diphone")
FESTIVAL_HELD_OUT = ("cmu_us_slt_arctic_hts",)
ASTERISK = Path("/usr/share/asterisk/sounds")
ASTERISK_TRAIN = ("fr_CA_f_June", "it_IT_m_Carlo", "ru_RU_f_IvrvoiceRU")
ASTERISK_HELD_OUT = ("en_US_f_Allison",)  # es_MX_f_Allison is the same speaker: used nowhere
#: prompts that are tones, not speech: left out of the recorded-speech evaluation
ASTERISK_NOT_SPEECH = ("beep", "beeperr", "ascending-2tone", "descending-2tone", "spy-jingle")
KTUBERLING = Path("/usr/share/ktuberling/sounds")
KTUBERLING_HELD_OUT = ("en", "de", "sl")
SONIC_PI = Path("/usr/share/sonic-pi/samples")
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
ALSA = Path("/usr/share/sounds/alsa")


# ----------------------------------------------------------------------------- reading
def read_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A file as float32 mono at ``sr``: soundfile where it reads the format, ffmpeg otherwise (G.722)."""
    import soundfile as sf

    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError):
        out = subprocess.run(["ffmpeg", "-v", "error", "-f", "g722", "-i", str(path), "-f", "s16le", "-ac", "1",
                              "-ar", str(sr), "-"], capture_output=True, check=True).stdout
        return np.frombuffer(out, dtype=np.int16).astype(np.float32) / 32768.0
    return resample(x.mean(axis=1), rate, sr)


def _trim(x: np.ndarray, thresh: float = 1e-3) -> np.ndarray:
    """Cut leading and trailing silence, keeping 50 ms of it either side."""
    loud = np.flatnonzero(np.abs(x) > thresh)
    if loud.size == 0:
        return x[:0]
    pad = SAMPLE_RATE // 20
    return x[max(0, loud[0] - pad): loud[-1] + pad]


# ----------------------------------------------------------------------------- sentences
def sentences(seed: int, n: int) -> list[str]:
    text = []
    for p in sorted(Path("/usr/share/common-licenses").iterdir()):
        if p.is_file():
            text.append(p.read_text(errors="replace"))
    words = re.sub(r"[^A-Za-z,.;' ]+", " ", " ".join(text)).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(6, 22)
        i = rng.randrange(len(words) - k)
        out.append(" ".join(words[i:i + k]))
    return out


# ----------------------------------------------------------------------------- synthesis
def _espeak(text: str, lang: str, variant: str, rate: int, pitch: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", f"{lang}+{variant}", "-s", str(rate), "-p", str(pitch), "-w", f.name,
                        text], check=True, capture_output=True)
        return _trim(read_audio(f.name))


def _festival(text: str, voice: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "t.txt").write_text(text)
        subprocess.run(["text2wave", "-eval", f"(voice_{voice})", "-o", f"{d}/o.wav", f"{d}/t.txt"],
                       check=True, capture_output=True, timeout=120)
        return _trim(read_audio(f"{d}/o.wav"))


def midi_file(seed: int, programs: list[int], seconds: float = 12.0) -> bytes:
    """A Standard MIDI File of random melodic phrases and chords over ``programs`` (and drums).

    Written by hand (the format is a few dozen bytes of framing) so that no
    MIDI library is needed for a few generated tunes.
    """
    rng = random.Random(seed)
    tpq = 480
    tempo = rng.randint(70, 160)
    tracks = []
    key = rng.randint(48, 60)
    scale = [0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.6 else [0, 2, 3, 5, 7, 8, 10]
    total_ticks = int(seconds * tempo / 60 * tpq)
    for ch, prog in enumerate(programs):
        ev = [(0, bytes([0xC0 | ch, prog]))]
        t = 0
        octave = 12 * rng.randint(0, 2)
        while t < total_ticks:
            dur = rng.choice([tpq // 4, tpq // 2, tpq, tpq * 2])
            chord = rng.random() < 0.25
            notes = [key + octave + scale[rng.randrange(7)]]
            if chord:
                notes += [notes[0] + 4, notes[0] + 7]
            vel = rng.randint(50, 120)
            for n in notes:
                ev.append((t, bytes([0x90 | ch, min(n, 127), vel])))
                ev.append((t + dur, bytes([0x80 | ch, min(n, 127), 0])))
            t += dur if rng.random() < 0.85 else dur * 2
        tracks.append(ev)
    drums = [(t, bytes([0x99, rng.choice([35, 38, 42, 46, 49]), rng.randint(60, 120)]))
             for t in range(0, total_ticks, tpq // 2) if rng.random() < 0.7]
    tracks.append(drums + [(t + 60, bytes([0x89, m[1], 0])) for t, m in drums])

    def vlq(v: int) -> bytes:
        out = [v & 0x7F]
        while v > 127:
            v >>= 7
            out.append(0x80 | (v & 0x7F))
        return bytes(reversed(out))

    chunks = [b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks) + 1, tpq)]
    tempo_track = b"\x00\xff\x51\x03" + (60_000_000 // tempo).to_bytes(3, "big") + b"\x00\xff\x2f\x00"
    chunks.append(b"MTrk" + struct.pack(">I", len(tempo_track)) + tempo_track)
    for ev in tracks:
        ev.sort(key=lambda e: (e[0], e[1][0] & 0xF0 == 0x90))
        body, last = b"", 0
        for t, msg in ev:
            body += vlq(t - last) + msg
            last = t
        body += b"\x00\xff\x2f\x00"
        chunks.append(b"MTrk" + struct.pack(">I", len(body)) + body)
    return b"".join(chunks)


def _render_midi(seed: int, programs: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "m.mid").write_bytes(midi_file(seed, programs))
        subprocess.run(["fluidsynth", "-ni", "-g", "0.6", "-F", f"{d}/o.wav", "-r", str(SAMPLE_RATE),
                        str(SOUNDFONT), f"{d}/m.mid"], check=True, capture_output=True, timeout=300)
        return _trim(read_audio(f"{d}/o.wav"))


def _held_out_name(name: str, one_in: int = 5) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % one_in == 0


# ----------------------------------------------------------------------------- jobs
def _jobs(seed: int, scale: float) -> tuple[list, list]:
    """(train jobs, eval jobs): each a (source label, callable giving float32 audio) pair."""
    rng = random.Random(seed)
    train, evals = [], []
    n_espeak = int(900 * scale)
    for text in sentences(seed, n_espeak):
        lang, var = rng.choice(ESPEAK_LANGS), rng.choice(ESPEAK_VARIANTS)
        rate, pitch = rng.randint(110, 260), rng.randint(15, 85)
        train.append((f"espeak/{lang}+{var}", lambda t=text, a=(lang, var, rate, pitch): _espeak(t, *a)))
    for i, text in enumerate(sentences(seed + 1, int(60 * scale))):
        var, rate, pitch = ESPEAK_HELD_OUT[i % 3], rng.randint(120, 220), rng.randint(25, 75)
        evals.append(("speech_unseen_voice", f"espeak-en-us+{var}-{i:03d}",
                      lambda t=text, a=("en-us", var, rate, pitch): _espeak(t, *a)))
    for k, voice in enumerate(FESTIVAL_TRAIN):
        for text in sentences(seed + 10 + k, int(45 * scale)):
            train.append((f"festival/{voice}", lambda t=text, v=voice: _festival(t, v)))
    for i, text in enumerate(sentences(seed + 2, int(30 * scale))):
        evals.append(("speech_unseen_voice", f"festival-slt-{i:03d}",
                      lambda t=text: _festival(t, FESTIVAL_HELD_OUT[0])))
    for voice in ASTERISK_TRAIN:
        files = sorted((ASTERISK / voice).glob("*.g722"))
        for p in files[: int(len(files) * min(1.0, scale))]:
            train.append((f"asterisk/{voice}", lambda p=p: _trim(read_audio(p))))
    files = sorted((ASTERISK / ASTERISK_HELD_OUT[0]).glob("*.g722"))
    for p in random.Random(seed).sample(files, int(60 * min(1.0, scale))):
        if p.stem in ASTERISK_NOT_SPEECH:
            continue
        evals.append(("speech_recorded", f"asterisk-allison-{p.stem}", lambda p=p: _trim(read_audio(p))))
    for lang_dir in sorted(KTUBERLING.iterdir()):
        held = lang_dir.name in KTUBERLING_HELD_OUT
        files = sorted(lang_dir.glob("*.ogg"))
        for p in files[: max(1, int(len(files) * min(1.0, scale)))]:
            if held:
                evals.append(("speech_recorded", f"ktuberling-{lang_dir.name}-{p.stem}",
                              lambda p=p: _trim(read_audio(p))))
            else:
                train.append((f"ktuberling/{lang_dir.name}", lambda p=p: _trim(read_audio(p))))
    for p in sorted(ALSA.glob("*.wav")):
        if p.stem != "Noise":
            evals.append(("speech_recorded", f"alsa-{p.stem}", lambda p=p: _trim(read_audio(p))))
    for p in sorted(SONIC_PI.glob("*.flac")):
        if _held_out_name(p.name):
            evals.append(("music", f"sonic-pi-{p.stem}", lambda p=p: read_audio(p)[: 12 * SAMPLE_RATE]))
        else:
            train.append(("sonic-pi", lambda p=p: read_audio(p)))
    # General MIDI programs 0-95 (instruments; above are effects), split by parity of program // 4
    train_progs = [p for p in range(96) if (p // 4) % 5 != 0]
    eval_progs = [p for p in range(96) if (p // 4) % 5 == 0]
    for i in range(int(60 * scale)):
        progs = rng.sample(train_progs, rng.randint(1, 3))
        train.append(("fluidsynth", lambda s=seed * 1000 + i, pr=progs: _render_midi(s, pr)))
    for i in range(int(10 * scale)):
        progs = rng.sample(eval_progs, rng.randint(1, 3))
        evals.append(("music", f"midi-{i:02d}", lambda s=10**6 + seed * 1000 + i, pr=progs: _render_midi(s, pr)))
    return train, evals


def _package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True)
        out[p] = r.stdout.strip() if r.returncode == 0 else "missing"
    return out


def build(out: str | os.PathLike, seed: int = 0, scale: float = 1.0, workers: int = 2) -> dict:
    """Build the training and evaluation material under ``out``; returns a summary."""
    missing = [t for t in ("espeak-ng", "text2wave", "fluidsynth", "ffmpeg") if shutil.which(t) is None]
    if missing:
        raise DependencyError(f"missing programs {missing}; apt-get install {' '.join(PACKAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_jobs, eval_jobs = _jobs(seed, scale)

    def make(job):
        try:
            return job()
        except (subprocess.SubprocessError, OSError, RuntimeError) as e:
            logger.warning("skipped a clip: %s", e)
            return np.zeros(0, np.float32)

    with ThreadPoolExecutor(workers) as pool:
        train_audio = list(pool.map(make, [j for _, j in train_jobs]))
        eval_audio = list(pool.map(make, [j for *_, j in eval_jobs]))
    clips = [(src, x) for (src, _), x in zip(train_jobs, train_audio, strict=True) if x.size >= SAMPLE_RATE // 4]
    # every 50th clip goes to validation (the same sources, other utterances)
    write_split(out, "train", [c for i, c in enumerate(clips) if i % 50 != 7])
    write_split(out, "valid", [c for i, c in enumerate(clips) if i % 50 == 7])
    import soundfile as sf

    for (group, name, _), x in zip(eval_jobs, eval_audio, strict=True):
        if x.size >= SAMPLE_RATE // 4:
            (out / "eval" / group).mkdir(parents=True, exist_ok=True)
            sf.write(str(out / "eval" / group / f"{name}.flac"), np.clip(x, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    seconds: dict[str, float] = {}
    for src, x in clips:
        key = src.split("/")[0]
        seconds[key] = seconds.get(key, 0.0) + x.size / SAMPLE_RATE
    summary = {"seed": seed, "scale": scale, "packages": _package_versions(),
               "train_seconds": {k: round(v, 1) for k, v in sorted(seconds.items())},
               "eval_files": {g: len(list((out / "eval" / g).glob("*.flac"))) for g in
                              ("speech_recorded", "speech_unseen_voice", "music")}}
    (out / "sources.json").write_text(json.dumps(summary, indent=1))
    return summary


@dataclass(frozen=True)
class BuildAudioDataConfig(Config):
    """Build the audio codec's training and evaluation material from Debian packages."""

    out: str = field(metadata={"help": "the directory to write (splits, eval/, sources.json)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice: sentences, voices, tunes"})
    scale: float = field(default=1.0, metadata={"help": "fraction of the clips to make (tests use 0.02)"})
    workers: int = field(default=2, metadata={"help": "clips made at once"})

    def __post_init__(self):
        check(self.scale > 0, f"scale must be positive, got {self.scale}")
        check(self.workers >= 1, f"workers must be at least 1, got {self.workers}")


def run(config: BuildAudioDataConfig) -> Path:
    """Build the material under ``config.out`` (its summary in ``sources.json``); returns that directory."""
    build(config.out, config.seed, config.scale, config.workers)
    return Path(config.out)


def main(argv: list[str] | None = None) -> int:
    return cli(BuildAudioDataConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
