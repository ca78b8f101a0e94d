"""``vgim data ...``: synthesise corpora and prepare shards. The main CLI calls `add_data_commands`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vgim_dist.config import ConfigError, check_uri
from vgim_dist.errors import UserError

ENGINES = "espeak-ng,flite,festival"  # vgim_dist.data.synth.ENGINES, named here so that help needs no torch


def _engines(value: str) -> tuple[str, ...]:
    return tuple(e for e in value.split(",") if e)


def _synth_deboer(a: argparse.Namespace) -> int:
    from vgim_dist.data.synth import synth_deboer  # noqa: PLC0415 - heavy imports only for the command that runs

    counts = synth_deboer(Path(a.out), words=a.words, voices_n=a.voices, takes=a.takes, second_takes=a.second_takes,
                          difficulty=a.difficulty, engines=_engines(a.engines), seed=a.seed,
                          published_naming=a.published_naming)
    print(f"wrote {counts} to {a.out}; prepare it with: vgim data prepare {a.out} --format deboer --out SHARDS "
          "(words; --level syllable for the syllables)")
    return 0


def _synth_librispeech(a: argparse.Namespace) -> int:
    from vgim_dist.data.synth import synth_librispeech  # noqa: PLC0415

    counts = synth_librispeech(Path(a.out), speakers=a.speakers, utterances=a.utterances, difficulty=a.difficulty,
                               engines=_engines(a.engines), seed=a.seed, disjoint_speakers=a.disjoint_speakers)
    print(f"wrote {counts} to {a.out}; prepare it with: vgim data prepare {a.out} --format librispeech "
          "--out SHARDS (the split files are in that folder)")
    return 0


def _prepare(a: argparse.Namespace) -> int:
    src = Path(a.src)
    if a.workers < 0:
        print(f"error: --workers must be 0 or more, got {a.workers}", file=sys.stderr)
        return 2
    if not src.is_dir():
        raise UserError("no corpus folder", str(src), "give the folder that holds the corpus")
    try:
        check_uri("--out", a.out, schemes=("s3",))
    except ConfigError as e:
        raise UserError(str(e), "vgim data prepare", "give a local folder or s3://bucket/prefix") from None
    # The arguments are checked before the corpus readers and the audio stack (torch, scipy) are imported.
    from vgim_dist.data import readers  # noqa: PLC0415
    from vgim_dist.data.audio import SAMPLE_RATE  # noqa: PLC0415
    from vgim_dist.data.prepare import MANIFEST, PrepareError, prepare  # noqa: PLC0415
    from vgim_dist.data.store import Store, StoreError  # noqa: PLC0415

    if a.format == "librispeech":
        corpus = readers.librispeech(src, split_dir=a.split_dir and Path(a.split_dir),
                                     phones=a.phones and Path(a.phones))
    elif a.format == "deboer":
        corpus = readers.deboer(src, level=a.level, split_rule=a.syllable_split)
    else:
        corpus = readers.folder(src, labels_csv=a.labels and Path(a.labels))
    corpus.info["source"] = str(src)
    try:
        m = prepare(corpus, Store(a.out, a.endpoint_url), shard_size=a.shard_size,
                    min_samples=max(1, round(a.min_seconds * SAMPLE_RATE)), workers=a.workers, address=a.address)
    except (StoreError, PrepareError) as e:
        raise UserError(str(e), str(src), "check the corpus folder, --format and --out") from e
    splits = {k: v["utterances"] for k, v in m["splits"].items()}
    if m["skipped"]:  # every skip is in the manifest; name the first few here
        shown = m["skipped"][:5]
        print(f"skipped {len(m['skipped'])} files (all listed under \"skipped\" in {a.out.rstrip('/')}/{MANIFEST}):",
              file=sys.stderr)
        for s in shown:
            print(f"  {s.get('path', s.get('id'))}: {s['reason']}", file=sys.stderr)
        if len(m["skipped"]) > len(shown):
            print(f"  ... and {len(m['skipped']) - len(shown)} more", file=sys.stderr)
    print(json.dumps({"out": a.out, "utterances": splits, "audio_seconds": round(m["audio_seconds"], 1),
                      "skipped": len(m["skipped"]), "duplicate_ids": len(m["duplicate_ids"]), "fixes": m["fixes"]}))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from vgim_dist.data.store import Store, StoreError  # noqa: PLC0415
    from vgim_dist.data.verify import NoManifest, verify  # noqa: PLC0415 - light: no torch, no corpus readers

    try:
        n, bad = verify(Store(a.uri, a.endpoint_url), log=lambda _line: None, cache_dir=a.cache_dir)
    except (StoreError, NoManifest) as e:
        raise UserError(str(e), a.uri, "check the URI and --endpoint-url") from e
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{n} shards verified in {a.uri}: " + (f"{len(bad)} damaged or missing" if bad else "all intact"))
    return 1 if bad else 0


def add_data_commands(subparsers) -> None:
    """Register ``data synth deboer``, ``data synth librispeech``, ``data prepare`` and ``data verify``."""
    data = subparsers.add_parser("data", help="synthesise corpora, prepare shards")
    dsub = data.add_subparsers(dest="data_command", required=True)

    synth = dsub.add_parser("synth", help="synthetic speech corpora from three speech engines").add_subparsers(
        dest="corpus", required=True)

    def variability(p: argparse.ArgumentParser) -> None:
        p.add_argument("--difficulty", type=float, default=1.0, help="scales pitch/rate jitter, noise, reverberation, "
                       "gain and silence jitter (0: clean; 1: SNR 10-20 dB, half the clips reverberant; docs/data.md)")
        p.add_argument("--engines", default=ENGINES, help="comma-separated speech engines to draw voices from")
        p.add_argument("--seed", type=int, default=0, help="seed of the voices, texts and jitter")

    p = synth.add_parser("deboer", help="CV-CV-CV words in the de Boer layout")
    p.add_argument("out")
    p.add_argument("--words", type=int, default=64, help="distinct words (of 729)")
    p.add_argument("--voices", type=int, default=4, help="speakers, each an (engine, voice, pitch, rate)")
    p.add_argument("--takes", type=int, default=1, help="recordings of each word per speaker")
    p.add_argument("--second-takes", type=int, default=0,
                   help="words the first speaker says once more (the published corpus: --words 729 --voices 1 "
                   "--second-takes 122 gives 851 recordings, 680 train / 171 test)")
    p.add_argument("--published-naming", action="store_true", help="syllable files named as in the published "
                   "corpus: all take _1, positions 1-3, test syllables from the second takes")
    variability(p)
    p.set_defaults(func=_synth_deboer)
    p = synth.add_parser("librispeech", help="sentences by distinct voices in the LibriSpeech layout: "
                         "OUT/train-clean-100/<speaker>/<chapter>/ and OUT/{train,test}_split.txt; prepare OUT")
    p.add_argument("out")
    p.add_argument("--speakers", type=int, required=True, help="distinct voices")
    p.add_argument("--utterances", type=int, required=True, help="per speaker")
    p.add_argument("--disjoint-speakers", action="store_true",
                   help="test speakers never occur in training (default: every speaker in both splits)")
    variability(p)
    p.set_defaults(func=_synth_librispeech)

    p = dsub.add_parser("prepare", help="corpus -> int16 16 kHz Parquet shards + manifest.json")
    p.add_argument("src")
    p.add_argument("--format", choices=("librispeech", "deboer", "folder"), required=True)
    p.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--shard-size", type=int, default=256, help="source files per shard")
    p.add_argument("--min-seconds", type=float, default=0.0, help="skip clips shorter than this")
    p.add_argument("--workers", type=int, default=0, help="build shards in parallel as Ray tasks on a private "
                   "Ray with this many CPUs (default 0: one process)")
    p.add_argument("--address", default="", help="build shards as Ray tasks on this Ray cluster, e.g. "
                   "10.0.0.5:6379 or auto; every node must see SRC at the same path")
    p.add_argument("--split-dir", help="librispeech: folder with <split>_split.txt files (default: SRC)")
    p.add_argument("--phones", help="librispeech: converted_aligned_phones.txt (default: SRC/...)")
    p.add_argument("--level", choices=("word", "syllable"), default="word", help="deboer")
    p.add_argument("--syllable-split", choices=("original", "clean"), default="original",
                   help="deboer syllables: the corpus folders, or the split of each syllable's word")
    p.add_argument("--labels", help="folder: CSV with a path column and label columns")
    p.set_defaults(func=_prepare)

    p = dsub.add_parser("verify", help="check every shard of a store against the checksums in its manifest, "
                        "and this machine's unpacked copies of them in the shard cache")
    p.add_argument("uri", help="local folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--cache-dir", default="", help="the shard cache training used (data.cache_dir; default: "
                   "$VGIM_CACHE, else ~/.cache/vgim_dist)")
    p.set_defaults(func=_verify)
