"""Corpus readers: list a corpus's utterances (id, speaker, split, file, labels) without decoding audio.

Every reader returns a `Corpus`; files it cannot place (no split, missing audio, no word for a
syllable) are listed in ``skipped`` with a reason, never dropped silently.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vgim_dist.data.provenance import Provenance

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")
SYLLABLES = ("ba", "bi", "bu", "da", "di", "du", "ga", "gi", "gu")  # class order of the syllable probe
VOWELS = ("a", "i", "u")
DEBOER_WORDS = "reshuffledv2"
DEBOER_SYLLABLES = "split up data padded"
DEBOER_SPEAKERS = "speakers.tsv"  # optional (synthetic corpora): recording name, tab, speaker id


@dataclass(frozen=True)
class Item:
    id: str
    speaker: str
    split: str
    path: Path
    labels: dict


@dataclass
class Corpus:
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}
    info: dict = field(default_factory=dict)  # format and split rule, copied into the manifest

    def skip(self, id_: str, path: Path | str, reason: str) -> None:
        self.skipped.append({"id": utf8_name(id_), "path": utf8_name(path), "reason": reason})


def utf8_name(name: Path | str) -> str:
    """A file name as valid UTF-8: bytes that are not (``os.fsdecode``'s surrogates) become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _audio_files(root: Path, corpus: Corpus | None = None) -> list[Path]:
    """Audio files under ``root``, sorted. Links that lead nowhere (dangling, or a loop) are skipped into
    ``corpus`` when given."""
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        if p.is_file():
            found.append(p)
        elif p.is_symlink() and corpus is not None:
            try:
                os.stat(p)
                reason = "symlink to something that is not a file"
            except OSError as e:
                reason = ("symlink loop" if e.errno == errno.ELOOP
                          else f"dangling symlink to {utf8_name(os.readlink(p))}")
            corpus.skip(p.relative_to(root).with_suffix("").as_posix(), p, reason)
    return found


def librispeech(root: Path, split_dir: Path | None = None, phones: Path | None = None) -> Corpus:
    """``<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` under ``root`` (any depth), transcripts as labels.

    Splits come from ``<name>_split.txt`` files (one utterance id per line) in ``split_dir`` (default:
    ``root``), e.g. the CPC ``train_split.txt`` / ``test_split.txt``; with none, everything is ``train``.
    Frame labels (``converted_aligned_phones.txt``: id, then one class per 10 ms) go into ``labels["phones"]``.
    """
    split_dir = split_dir or root
    split_of: dict[str, str] = {}
    for f in sorted(split_dir.glob("*_split.txt")):
        for line in f.read_text().split():
            split_of[line] = f.name.removesuffix("_split.txt")
    phones = phones or (root / "converted_aligned_phones.txt")
    frame_labels = {}
    if phones.is_file():
        for line in phones.read_text().splitlines():
            if parts := line.split():
                frame_labels[parts[0]] = [int(v) for v in parts[1:]]
    text = {}
    for t in root.rglob("*.trans.txt"):
        for line in t.read_text().splitlines():
            uid, _, words = line.partition(" ")
            text[uid] = words.strip()

    if not split_of:
        near = [d for d in (root.parent, root.parent.parent) if any(d.glob("*_split.txt"))]
        log.warning("%s: no <split>_split.txt files, so every utterance goes to the train split (probes and "
                    "decoders need a test split)%s", split_dir,
                    f"; {near[0]} has some: pass --split-dir {near[0]}" if near else "")
    corpus = Corpus([], info={"format": "librispeech", "split_rule": "split files" if split_of else "all train"})
    found = set()
    for p in _audio_files(root, corpus):
        uid = utf8_name(p.stem)
        found.add(uid)
        split = split_of.get(uid, "train" if not split_of else "")
        if not split:
            corpus.skip(uid, p, "not in any split file")
            continue
        labels = {"chapter": uid.split("-")[1] if uid.count("-") == 2 else "", "text": text.get(uid, "")}
        if uid in frame_labels:
            labels["phones"] = frame_labels[uid]
        corpus.items.append(Item(uid, uid.split("-")[0], split, p, labels))
    for uid in sorted(set(split_of) - found):
        corpus.skip(uid, split_dir, f"listed in {split_of[uid]}_split.txt but no audio file")
    return corpus


def _deboer_speakers(root: Path) -> dict[str, str]:
    path = root / DEBOER_SPEAKERS
    if not path.is_file():
        return {}
    return dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)


def deboer(root: Path, level: Literal["word", "syllable"] = "word",
           split_rule: Literal["original", "clean"] = "original") -> Corpus:
    """The de Boer layout: words ``reshuffledv2/<split>/<word>_<take>.wav`` and syllables
    ``split up data padded/<split>/<word>_<take>_<position>_<syllable>.wav``.

    ``split_rule="clean"`` puts each syllable in the split of the word recording it was cut from, found from
    the audio (`vgim_dist.data.provenance`), not from the take in its name, which the published corpus gets
    wrong; the syllable's id then names that recording. A syllable whose recording cannot be found is
    skipped with the reason. ``original`` keeps the folders. Speakers come from ``speakers.tsv`` when the
    corpus has one (synthetic corpora), else every item is speaker ``deboer``.
    """
    words = {utf8_name(p.stem): p for p in _audio_files(root / DEBOER_WORDS)}
    speaker_of = _deboer_speakers(root)
    if level == "word":
        corpus = Corpus([], info={"format": "deboer", "level": "word", "split_rule": "original"})
        for p in _audio_files(root / DEBOER_WORDS, corpus):
            stem = utf8_name(p.stem)
            corpus.items.append(Item(stem, speaker_of.get(stem, "deboer"), utf8_name(p.parent.name), p,
                                     {"word": stem.split("_")[0]}))
        return corpus
    corpus = Corpus([], info={"format": "deboer", "level": "syllable", "split_rule": split_rule})
    provenance = Provenance(words) if split_rule == "clean" else None
    renamed = 0
    for p in _audio_files(root / DEBOER_SYLLABLES, corpus):
        stem = utf8_name(p.stem)
        parts, syllable = stem.split("_"), stem[-2:]
        if len(parts) != 4 or syllable not in SYLLABLES:
            corpus.skip(stem, p, "name is not <word>_<take>_<position>_<syllable>")
            continue
        recording, split, uid = f"{parts[0]}_{parts[1]}", utf8_name(p.parent.name), stem
        if provenance is not None:
            match = provenance.match(p, parts[0])
            if match.recording is None:
                corpus.skip(stem, p, f"clean split: provenance unknown ({match.reason})")
                continue
            renamed += match.recording != recording
            recording, split = match.recording, utf8_name(words[match.recording].parent.name)
            uid = f"{recording}_{parts[2]}_{syllable}"
        labels = {"syllable": syllable, "vowel": syllable[1], "word": parts[0], "position": int(parts[2]),
                  "recording": recording}
        corpus.items.append(Item(uid, speaker_of.get(recording, "deboer"), split, p, labels))
    if provenance is not None:
        unknown = sum(s["reason"].startswith("clean split") for s in corpus.skipped)
        corpus.info["provenance"] = {
            "method": "normalised cross-correlation of each syllable against its word's recordings",
            "matched": len(corpus.items), "unknown": unknown, "take_in_name_wrong": renamed}
        if unknown:
            corpus.info["split_rule"] = "clean (syllables of unknown provenance left out)"
    return corpus


def folder(root: Path, labels_csv: Path | None = None) -> Corpus:
    """Any WAV/FLAC files under ``root``; id = path without suffix, speaker = parent folder.

    With a CSV (header row; a ``path`` column relative to ``root``, optional ``speaker`` and ``split``,
    every other column a label), the CSV defines the corpus and files not in it are skipped.
    """
    corpus = Corpus([], info={"format": "folder", "split_rule": "csv split column" if labels_csv else "all train"})
    files = {utf8_name(p.relative_to(root).as_posix()): p for p in _audio_files(root, corpus)}
    if labels_csv is None:
        rows = [{"path": rel} for rel in files]
    else:
        with labels_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise ValueError(f"{labels_csv}: needs a 'path' column (audio file relative to {root})")
        listed = {r.get("path", "") for r in rows}
        for rel in sorted(set(files) - listed):
            corpus.skip(rel.rsplit(".", 1)[0], files[rel], f"not in {labels_csv.name}")
    for row in rows:
        rel = row.pop("path", "")
        uid = rel.rsplit(".", 1)[0]
        if rel not in files:
            corpus.skip(uid, root / rel, f"listed in {labels_csv.name if labels_csv else 'CSV'} but no audio file")
            continue
        speaker = row.pop("speaker", "") or (Path(rel).parent.name or "unknown")
        split = row.pop("split", "") or "train"
        corpus.items.append(Item(uid, speaker, split, files[rel], row))
    corpus.items.sort(key=lambda it: it.id)
    return corpus

