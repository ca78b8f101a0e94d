"""Synthetic corpora and the corpus readers: layouts, naming, labels, splits."""

from __future__ import annotations

import math
import random
import re

import soundfile as sf

from vgim_dist.data import readers
from vgim_dist.data.prepare import duplicate_ids
from vgim_dist.data.readers import DEBOER_SYLLABLES, DEBOER_WORDS, SYLLABLES
from vgim_dist.data.synth import ENGINES, _split, draw_speakers, synth_deboer


def test_deboer_layout_and_naming(deboer_dir):
    words = sorted((deboer_dir / DEBOER_WORDS).glob("*/*.wav"))
    syls = sorted((deboer_dir / DEBOER_SYLLABLES).glob("*/*.wav"))
    assert len(words) == 24 and len(syls) == 72
    assert {p.parent.name for p in words} == {"train", "test"} == {p.parent.name for p in syls}
    cv = "(?:[bdg][aiu])"
    assert all(re.fullmatch(f"{cv}{{3}}_[12]", p.stem) for p in words)
    assert all(re.fullmatch(f"({cv}{{3}})_[12]_([012])_({cv})", p.stem) for p in syls)
    for p in syls:  # the syllable named is the one at that position of the word
        word, _, pos, syl = p.stem.split("_")
        assert word[2 * int(pos):2 * int(pos) + 2] == syl
    assert {sf.info(p).samplerate for p in words} == {44100}
    assert {sf.info(p).samplerate for p in syls} == {22050}
    assert len({sf.info(p).frames for p in syls}) == 1  # zero-padded to equal length
    assert all(0.5 < sf.info(p).duration < 2.0 for p in words)


def test_deboer_reader_labels_and_clean_split(deboer_dir):
    words = readers.deboer(deboer_dir, level="word")
    assert len(words.items) == 24 and not words.skipped
    assert all(it.labels["word"] == it.id.split("_")[0] for it in words.items)
    word_split = {it.id: it.split for it in words.items}

    original = readers.deboer(deboer_dir, level="syllable", split_rule="original")
    clean = readers.deboer(deboer_dir, level="syllable", split_rule="clean")
    assert (original.info["split_rule"], clean.info["split_rule"]) == ("original", "clean")
    assert [it.id for it in original.items] == [it.id for it in clean.items]
    for it in clean.items:
        assert it.labels["syllable"] == it.id[-2:] and it.labels["syllable"] in SYLLABLES
        assert it.labels["vowel"] == it.id[-1]
        assert it.split == word_split["_".join(it.id.split("_")[:2])]
    # The folders' own split leaks test syllables from training words: that is what "clean" repairs.
    assert any(a.split != b.split for a, b in zip(original.items, clean.items))


def test_librispeech_layout_speakers_and_splits(librispeech_dir):
    corpus = readers.librispeech(librispeech_dir)
    assert len(corpus.items) == 18 and not corpus.skipped
    assert corpus.info["split_rule"] == "split files"
    for it in corpus.items:
        assert re.fullmatch(r"\d+-\d+-\d{4}", it.id) and it.path.suffix == ".flac"
        assert it.path.parent.name == it.labels["chapter"] and it.path.parent.parent.name == it.speaker
        assert re.fullmatch(r"[A-Z ]+", it.labels["text"]) and len(it.labels["text"].split()) >= 5
        assert sf.info(it.path).samplerate == 16000
    speakers = {it.speaker for it in corpus.items}
    assert len(speakers) == 3
    for split in ("train", "test"):  # the speaker probe needs every speaker on both sides
        assert {it.speaker for it in corpus.items if it.split == split} == speakers


def test_librispeech_phones_and_unsplit_files(librispeech_dir, tmp_path):
    ids = sorted(it.id for it in readers.librispeech(librispeech_dir).items)
    (tmp_path / "train_split.txt").write_text("\n".join(ids[:10] + ["999-1-0000"]))
    (tmp_path / "test_split.txt").write_text("\n".join(ids[10:17]))
    phones = tmp_path / "phones.txt"
    phones.write_text(f"{ids[0]} 3 3 7 40\n")
    corpus = readers.librispeech(librispeech_dir, split_dir=tmp_path, phones=phones)
    assert len(corpus.items) == 17
    assert {s["id"]: s["reason"] for s in corpus.skipped} == {
        ids[17]: "not in any split file", "999-1-0000": "listed in train_split.txt but no audio file"}
    by_id = {it.id: it for it in corpus.items}
    assert by_id[ids[0]].labels["phones"] == [3, 3, 7, 40] and "phones" not in by_id[ids[1]].labels


def test_folder_reader_with_and_without_csv(librispeech_dir, tmp_path):
    flacs = sorted(librispeech_dir.rglob("*.flac"))[:3]
    for i, p in enumerate(flacs):
        (tmp_path / f"spk{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"spk{i % 2}" / p.name).write_bytes(p.read_bytes())
    plain = readers.folder(tmp_path)
    assert [it.speaker for it in plain.items] == ["spk0", "spk0", "spk1"]  # sorted by id
    assert {it.split for it in plain.items} == {"train"}

    csv = tmp_path / "labels.csv"
    rel = [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*.flac"))]
    csv.write_text(f"path,speaker,split,emotion\n{rel[0]},alice,test,happy\n{rel[1]},,,sad\nmissing.wav,,,x\n")
    labelled = readers.folder(tmp_path, labels_csv=csv)
    assert [(it.speaker, it.split, it.labels) for it in labelled.items] == [
        ("alice", "test", {"emotion": "happy"}), ("spk0", "train", {"emotion": "sad"})]
    assert sorted(s["reason"] for s in labelled.skipped) == [
        "listed in labels.csv but no audio file", "not in labels.csv"]


def test_speakers_are_distinct_tuples_from_every_engine():
    people = draw_speakers(40)
    assert len({p.id for p in people}) == 40
    assert (people[0].engine, people[0].voice, people[0].pitch, people[0].rate) == ("espeak-ng", "en-us", 50, 160)
    assert {p.engine for p in people[:4]} == set(ENGINES)
    assert any(p.voice.split("+")[0] in ("es", "it", "de") for p in people[:4])  # an accent among the first four
    assert draw_speakers(40) == people  # seeded
    assert draw_speakers(40, seed=1) != people


def test_published_word_counts():
    """--words 729 --second-takes 122: 851 recordings, split 680 / 171 as the published corpus."""
    split = _split([f"w{i}" for i in range(851)], 0.2, random.Random(0))
    assert sum(v == "test" for v in split.values()) == 171 == math.ceil(0.2 * 851)


def test_clean_split_finds_provenance_in_the_audio_despite_published_naming(tmp_path):
    """The published corpus's traps: every syllable file is named take _1 (positions 1-3), and the test
    syllables come from the second takes. Names alone put them beside their own recording's words; the
    audio says where each was cut from."""
    counts = synth_deboer(tmp_path, words=6, voices_n=1, second_takes=6, engines=("espeak-ng",), seed=3,
                          published_naming=True)
    assert counts["words"] == 12 and counts["syllables"] == 36
    names = {p.stem for p in (tmp_path / DEBOER_SYLLABLES).rglob("*.wav")}
    assert len(names) == 18 and all(n.split("_")[1] == "1" for n in names)  # 36 files, 18 distinct names

    original = readers.deboer(tmp_path, level="syllable", split_rule="original")
    assert len(duplicate_ids(original.items)) == 18  # every id twice, once per split

    clean = readers.deboer(tmp_path, level="syllable", split_rule="clean")
    word_split = {it.id: it.split for it in readers.deboer(tmp_path, level="word").items}
    assert clean.info["split_rule"] == "clean" and not clean.skipped and not duplicate_ids(clean.items)
    assert clean.info["provenance"]["take_in_name_wrong"] == 18
    for it in clean.items:  # the test folder holds the second takes: the audio must say so
        take = "1" if it.path.parent.name == "train" else "2"
        assert it.labels["recording"] == f"{it.labels['word']}_{take}"
        assert it.split == word_split[it.labels["recording"]]
        assert it.id == f"{it.labels['recording']}_{it.labels['position']}_{it.labels['syllable']}"


def test_clean_split_refuses_syllables_of_unknown_provenance(tmp_path):
    synth_deboer(tmp_path, words=3, voices_n=1, engines=("espeak-ng",), seed=5)
    victim = sorted((tmp_path / DEBOER_WORDS).rglob("*.wav"))[0]
    x, sr = sf.read(victim, dtype="float32")
    sf.write(victim, x[::-1].copy(), sr)  # the word recording no longer contains its syllables
    clean = readers.deboer(tmp_path, level="syllable", split_rule="clean")
    lost = [s for s in clean.skipped if s["id"].startswith(victim.stem + "_")]
    assert len(lost) == 3 and all("provenance unknown" in s["reason"] for s in lost)
    assert clean.info["split_rule"].startswith("clean (syllables of unknown provenance left out")
    assert clean.info["provenance"]["unknown"] == 3 and len(clean.items) == 6


def test_a_subset_folder_without_split_files_is_all_train_and_says_where_they_are(librispeech_dir, caplog):
    """`vgim data synth librispeech OUT` writes OUT/train-clean-100/ and OUT/*_split.txt: preparing the subset
    folder finds no split files, puts everything in train, and says so, naming the folder that has them."""
    subset = next(d for d in librispeech_dir.iterdir() if d.is_dir())
    with caplog.at_level("WARNING", logger="vgim_dist.data.readers"):
        corpus = readers.librispeech(subset)
    assert corpus.info["split_rule"] == "all train" and {it.split for it in corpus.items} == {"train"}
    assert f"pass --split-dir {librispeech_dir}" in caplog.text
    assert "every utterance goes to the train split" in caplog.text
    caplog.clear()
    readers.librispeech(librispeech_dir)
    assert "split" not in caplog.text
