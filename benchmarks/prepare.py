"""Data preparation throughput: utterances per second in one process, and as Ray tasks on 1 and 2 workers.

    .venv/bin/python benchmarks/prepare.py [--speakers 20] [--utterances 25] [--copies 12]
        [--shard-size 128]

A synthetic LibriSpeech-layout corpus (espeak-ng sentences, 16 kHz FLAC, 6,000 utterances by default;
built once under build/) is prepared into fresh local shard folders three ways, all in one invocation. For
Ray, the private Ray and its worker processes are started (and the shard code imported in each) before the
clock starts, so the figures are steady-state throughput; the start itself is printed separately. The
machine's load average is printed before and after: on a shared machine it says how far the figures can be
trusted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

from vgim_dist import ray_session
from vgim_dist.data import readers
from vgim_dist.data.prepare import prepare
from vgim_dist.data.store import Store
from vgim_dist.data.synth import synth_librispeech

LIBRISPEECH_960 = 281_241   # utterances in train-clean-100 + train-clean-360 + train-other-500
LIBRISPEECH_960_S = 960.0 * 3600     # and their audio, about 960 hours


def corpus_dir(speakers: int, utterances: int, copies: int) -> Path:
    """``speakers x utterances`` espeak-ng sentences, then ``copies`` of that corpus under other speaker ids
    (hard links: decoding costs the same, synthesis only once), in the LibriSpeech layout with split files."""
    build = Path(__file__).resolve().parents[1] / "build"
    base = build / f"bench-librispeech-{speakers}x{utterances}"
    if not (base / "train_split.txt").exists():
        t0 = time.perf_counter()
        shutil.rmtree(base, ignore_errors=True)
        synth_librispeech(base, speakers=speakers, utterances=utterances, seed=0)
        print(f"synthesised {speakers * utterances} utterances in {time.perf_counter() - t0:.0f} s -> {base}")
    root = build / f"bench-librispeech-{speakers}x{utterances}x{copies}"
    if not (root / "train_split.txt").exists():
        shutil.rmtree(root, ignore_errors=True)
        splits = {name: (base / f"{name}_split.txt").read_text().split() for name in ("train", "test")}
        for c in range(copies):
            def renamed(uid: str, c: int = c) -> str:   # speaker 100 -> 100 + 1000 c, chapter likewise
                spk, chapter, utt = uid.split("-")
                return f"{int(spk) + 1000 * c}-{int(chapter) + 1000 * c}-{utt}"
            for f in base.rglob("*.flac"):
                uid = renamed(f.stem)
                spk, chapter, _ = uid.split("-")
                folder = root / "train-clean-100" / spk / chapter
                folder.mkdir(parents=True, exist_ok=True)
                os.link(f, folder / f"{uid}.flac")
            for t in base.rglob("*.trans.txt"):
                lines = [f"{renamed(line.split(' ', 1)[0])} {line.split(' ', 1)[1]}"
                         for line in t.read_text().splitlines()]
                spk, chapter = renamed(t.name.split(".")[0] + "-0").split("-")[:2]
                (root / "train-clean-100" / spk / chapter / f"{spk}-{chapter}.trans.txt").write_text(
                    "\n".join(lines) + "\n")
            for name, ids in splits.items():
                with open(root / f"{name}_split.txt", "a") as out:
                    out.write("".join(f"{renamed(u)}\n" for u in ids))
    return root


@ray.remote(num_cpus=1)
def _warm() -> int:
    import vgim_dist.data.prepare  # noqa: F401, PLC0415 - what every shard task imports first

    time.sleep(1.0)     # hold the CPU so that the next warm-up task starts another worker process
    return os.getpid()


def timed(corpus: readers.Corpus, out: Path, shard_size: int, workers: int) -> tuple[float, float]:
    """(seconds the preparation took, seconds of audio it prepared)."""
    t0 = time.perf_counter()
    manifest = prepare(corpus, Store(str(out)), shard_size=shard_size, log=lambda _: None, workers=workers)
    return time.perf_counter() - t0, manifest["audio_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speakers", type=int, default=20)
    p.add_argument("--utterances", type=int, default=25, help="per speaker")
    p.add_argument("--copies", type=int, default=12, help="copies of the synthesised corpus, under other speakers")
    p.add_argument("--shard-size", type=int, default=128)
    a = p.parse_args()
    corpus = readers.librispeech(corpus_dir(a.speakers, a.utterances, a.copies))
    n = len(corpus.items)
    hours = sum(it.path.stat().st_size for it in corpus.items)
    print(f"{n} utterances ({hours / 2**20:.0f} MiB of FLAC), shards of {a.shard_size}, {os.cpu_count()} CPUs, "
          f"load average before {os.getloadavg()[0]:.1f}")
    rates, audio = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        took, audio_s = timed(corpus, Path(tmp, "serial"), a.shard_size, 0)
        rates["1 process"], audio["1 process"] = n / took, audio_s / took
        for workers in (1, 2):
            t0 = time.perf_counter()
            ray_session.connect(num_cpus=workers)
            pids = set(ray.get([_warm.remote() for _ in range(workers)]))
            print(f"Ray with {workers} worker(s) started in {time.perf_counter() - t0:.1f} s ({len(pids)} processes)")
            took, audio_s = timed(corpus, Path(tmp, f"ray{workers}"), a.shard_size, workers)
            rates[f"{workers} Ray worker(s)"], audio[f"{workers} Ray worker(s)"] = n / took, audio_s / took
            ray.shutdown()
    for name, r in rates.items():
        print(f"{name:>16}: {r:7.1f} utterances/s, {audio[name]:7.0f} s of audio per s")
    per_core, audio_per_core = rates["2 Ray worker(s)"] / 2, audio["2 Ray worker(s)"] / 2
    print(f"2 workers / 1 worker: {rates['2 Ray worker(s)'] / rates['1 Ray worker(s)']:.2f}x; per core at 2 workers: "
          f"{per_core:.1f} utterances/s, {audio_per_core:.0f} s of audio per s (mean utterance "
          f"{audio['1 process'] / rates['1 process']:.1f} s)")
    print(f"LibriSpeech-960 ({LIBRISPEECH_960:,} utterances, {LIBRISPEECH_960_S / 3600:.0f} h) on 64 cores at that "
          f"audio rate per core: {LIBRISPEECH_960_S / (64 * audio_per_core) / 60:.1f} min")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
