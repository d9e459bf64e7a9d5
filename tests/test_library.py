"""A library that teaches itself (issue 28), classified at full width and from the embedding store (issue 26).

One generated library laid out as people keep one (``Artist/Album/NN Track.ext``, 16 kHz MP3, FLAC,
Ogg Vorbis and WAV written here with album, artist and title tags; half the albums tagged by genre
in several spellings, the rest untagged), the committed real-encoder files, a real ingest with labels
from the tags and the pretrained backbone on the inference engine, a real frozen-backbone run
trained on it, real Ray (the session's 2-CPU local Ray, and the CLI's own), real Parquet, real
mutagen.  Whether a file was decoded is read from what ran, or shown by overwriting a file's bytes
with noise while keeping its size and modification time: only a run that never decodes it can still
score it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genrecls.core.config import Config
from genrecls.jobs.classify import classify
from genrecls.storage.dataset import Dataset
from genrecls.storage.predictions import read_predictions

REPO = Path(__file__).resolve().parents[1]
ENCODERS = REPO / "tests" / "data" / "encoders"
GENRES = ["rock", "electronic", "jazz"]
#: the library's vocabulary: each genre's spellings merge (genrecls.audio.sample_data.SPELLINGS)
VOCAB = """drop = ["Unknown"]
[genres.Rock]
aliases = ["Rock & Roll"]
[genres.Electronic]
aliases = ["Electronica", "Electro"]
[genres.Jazz]
"""
#: a quick head: one candidate, one strength (the choice itself is test_head's)
TRAIN = ["train.head_candidates=[\"penultimate\"]", "train.head_c=[0.1]", "ingest.tracks_per_task=3"]


def cfg(*more: str) -> Config:
    return Config().override([*TRAIN, *more])


def by_path(table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


def probs(row: dict) -> np.ndarray:
    return np.array([v for k, v in sorted(row.items()) if k.startswith("prob_")], np.float64)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """3 genres x 2 artists x one album of 4 tracks x 7 s: one album per genre tagged (a spelling of its
    genre), the other untagged; returns (root, vocabulary file, answer key)."""
    from genrecls.audio.sample_data import make_tagged_library

    base = tmp_path_factory.mktemp("library")
    truth = make_tagged_library(str(base / "lib"), genres=3, artists_per_genre=2, tracks_per_album=4, seconds=7.0,
                                sr=16000, tagged=0.5, unknown=0, seed=5)
    (base / "genres.toml").write_text(VOCAB)
    return base / "lib", base / "genres.toml", truth


def tags_cfg(vocab, *more: str) -> Config:
    return cfg("ingest.labels_from=tags", f"ingest.labels={json.dumps(str(vocab))}",
               f"classify.labels={json.dumps(str(vocab))}", *more)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, library, ray_local):
    from genrecls.jobs.ingest import ingest

    root, vocab, _ = library
    out = tmp_path_factory.mktemp("library-ds") / "ds"
    s = ingest(str(root), str(out), tags_cfg(vocab), progress=False)
    assert (s.added, s.failed, s.embeddings, s.labels_from) == (24, 0, "computed", "tags")
    return out, s


@pytest.fixture(scope="module")
def run(tmp_path_factory, library, dataset, ray_local):
    from genrecls.jobs.training import train

    out = tmp_path_factory.mktemp("library-run") / "run"
    train(str(dataset[0]), str(out), tags_cfg(library[1]), progress=False)
    return out


@pytest.fixture(scope="module")
def computed(tmp_path_factory, library, run):
    """The library classified without a dataset by the CLI on a Ray of its own with 2 CPUs, every track decoded and
    its backbone run, with two of its tasks held at once at their pause point (two processes running the chain)
    before they go on.  (A Ray of its own: the session's Ray may still hold CPUs for a driver another test killed.)"""
    from conftest import Pauses

    pauses = Pauses(os.environ["GENRECLS_PAUSE_DIR"])
    out = tmp_path_factory.mktemp("library-pred") / "computed"
    config = tmp_path_factory.mktemp("library-cfg") / "config.json"
    config.write_text(tags_cfg(library[1], "classify.in_process_mb=0").to_json())
    pauses.arm("classify-featurise")
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "classify", str(library[0]), "--model", str(run),
                             "--out", str(out), "--config", str(config), "--workers", "2", "-q"], cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        held = [pauses.wait("classify-featurise", proc)]
        pauses.arm("classify-featurise")  # a second task reaches it while the first is held: another process
        held.append(pauses.wait("classify-featurise", proc))
    finally:
        pauses.reset()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and not stderr.strip(), stderr[-3000:]  # a healthy run: no line of Ray's
    summary = json.loads((out / "classify.json").read_text())["last_run"]
    assert summary["classified"] == 24 and summary["from_store"] == 0
    return summary, by_path(read_predictions(out)), held


def copy_dataset(dataset, tmp_path, lib) -> Path:
    """A copy of the dataset whose tracks are a copy of the library (its root recorded in the manifest)."""
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "root": str(lib)}))
    return ds


# -- issue 26: every CPU, and the store ----------------------------------------------------------
def test_classify_runs_the_whole_chain_in_every_cpu_task(computed):
    """Given 2 CPUs, two processes run decoding and the backbone at once (each held inside its task while the other
    arrived), one engine thread each (the CPU Ray gave each task), as the run's summary reads back."""
    s, _, held = computed
    assert held[0] != held[1]
    assert s["ran"] == "ray tasks" and s["processes"] >= 2
    assert s["engine"]["engine"] != "none" and s["engine"]["threads"] == 1


def test_stored_tracks_are_scored_from_the_store_as_if_computed(library, dataset, run, computed, tmp_path):
    """--dataset scores every stored track from its stored layers: the same answers as computing them, and a
    file whose bytes are now noise (size and modification time kept) is not even opened for decoding."""
    lib = tmp_path / "lib"
    shutil.copytree(library[0], lib)
    victim = sorted(lib.rglob("*.wav"))[0]
    st = victim.stat()
    victim.write_bytes(np.random.default_rng(0).bytes(st.st_size))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = copy_dataset(dataset[0], tmp_path, lib)  # the dataset's tracks are found by their absolute path
    out = tmp_path / "pred"
    s = classify(str(lib), str(run), str(out), tags_cfg(library[1], f"classify.dataset={json.dumps(str(ds))}"),
                 progress=False)
    assert s["classified"] == 24 and s["failed"] == 0 and s["from_store"] == 24
    assert s["store"]["used"] and s["store"]["stored"] == 24 and s["store"]["computed"] == 0
    assert s["engine"]["engine"] == "none"  # no backbone ran
    stored, reference = by_path(read_predictions(out)), computed[1]
    assert set(stored) == set(reference)
    for path, row in stored.items():
        ref = reference[path]
        assert row["top_genre"] == ref["top_genre"] and row["n_segments"] == ref["n_segments"]
        assert row["genre_tag"] == ref["genre_tag"] and row["album"] == ref["album"]  # the dataset's tags
        assert np.abs(probs(row) - probs(ref)).max() < 2e-3, path  # float16 layers against the engine's float32
        assert np.allclose(row["embedding"], ref["embedding"], rtol=1e-2, atol=1e-2)


def test_changed_and_new_files_are_computed_the_rest_read_from_the_store(library, dataset, run, computed, tmp_path):
    from genrecls.audio.sample_data import synthesize, write_audio

    lib = tmp_path / "lib"
    shutil.copytree(library[0], lib)
    ds = copy_dataset(dataset[0], tmp_path, lib)
    changed = sorted(lib.rglob("*.wav"))[1]
    write_audio(str(changed), synthesize("rock", 7.0, seed=42), 16000)  # other audio, a new stat
    (lib / "new").mkdir()
    write_audio(str(lib / "new" / "n.wav"), synthesize("jazz", 7.0, seed=43), 16000)
    out = tmp_path / "pred"
    s = classify(str(lib), str(run), str(out), tags_cfg(library[1], f"classify.dataset={json.dumps(str(ds))}"),
                 progress=False)
    assert s["classified"] == 25 and s["from_store"] == 23
    assert s["store"]["computed_why"] == {"changed since it was ingested": 1, "not in the dataset": 1}
    rows = by_path(read_predictions(out))
    rel = changed.relative_to(lib).as_posix()
    assert rows[rel]["size"] == changed.stat().st_size  # scored as it is now, not as stored
    assert np.abs(probs(rows[rel]) - probs(computed[1][rel])).max() > 1e-3  # not the stored track's answer


@pytest.mark.parametrize("other", ["backbone", "features"])
def test_a_store_of_another_backbone_or_features_is_named_and_not_used(other, library, dataset, run, small_cfg,
                                                                       tmp_path, caplog):
    from dataclasses import asdict

    from genrecls.models.engine import BACKBONE_OUTPUTS, backbone_id
    from genrecls.storage.embeddings import stored_embedding

    ds = tmp_path / "ds"
    shutil.copytree(dataset[0], ds)
    features = Dataset(str(ds)).feature_config()
    how = (stored_embedding("part-x.parquet", "other-backbone-0000", features, BACKBONE_OUTPUTS, {})
           if other == "backbone" else stored_embedding("part-x.parquet", backbone_id(), small_cfg.features,
                                                        BACKBONE_OUTPUTS, {}))
    entry = {f"embedding_{k}": v for k, v in asdict(how).items() if k != "part"}
    Dataset(str(ds)).commit(update={t: entry for t in Dataset(str(ds)).tracks()})  # the store's every entry
    s = classify(str(library[0]), str(run), str(tmp_path / "p"),
                 tags_cfg(library[1], f"classify.dataset={json.dumps(str(ds))}"), progress=False)
    named = "other-backbone-0000" if other == "backbone" else "another feature configuration"
    assert not s["store"]["used"] and named in s["store"]["reason"], s["store"]
    assert s["classified"] == 24 and s["from_store"] == 0  # computed, never mixed
    assert any(named in r.getMessage() for r in caplog.records)


def test_a_model_on_spectrograms_says_so_and_computes(library, dataset, small_cfg, tmp_path):
    from conftest import constant_run

    cnn = constant_run(tmp_path / "cnn", small_cfg.features, ["a", "b"])
    s = classify(str(library[0]), str(cnn), str(tmp_path / "p"),
                 small_cfg.override([f"classify.dataset={json.dumps(str(dataset[0]))}"]), progress=False)
    assert not s["store"]["used"] and "scores spectrograms" in s["store"]["reason"]
    assert s["classified"] == 24 and s["from_store"] == 0


def cli(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "genrecls", *args, "-q"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    assert res.returncode in ok, res.stderr[-3000:]
    return res


def test_real_encoder_files_tagged_by_genrecls_are_not_redone_and_a_persons_tags_stay(run, tmp_path):
    """Real-encoder files (lame, ffmpeg, flac, oggenc, opusenc), half of them tagged by a person: ingest, classify
    from the store, tag --apply; the person's tags are as they were, every file's audio packets too; then classify
    and ingest again leave every file alone (no decoding: the audio did not change)."""
    from genrecls.audio import audio_fingerprint, open_tags, read_fields, write_person_tags
    from genrecls.jobs.ingest import ingest
    from genrecls.jobs.tagging import tag

    lib = tmp_path / "lib"
    picks = ["mp3/lame_vbr_v2_xing.mp3", "mp3/id3v24_cover.mp3", "flac/flac_seektable.flac",
             "ogg/oggenc_mono_22k.ogg", "opus/opusenc_48k_stereo.opus", "wav/" + sorted(
                 p.name for p in (ENCODERS / "wav").iterdir())[0]]
    paths = []
    for i, rel in enumerate(picks):
        dst = lib / ("a", "b", "c")[i % 3] / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ENCODERS / rel, dst)
        if i % 2:
            write_person_tags(str(dst), genre=["Polka"])  # a person's genre: never changed
        paths.append(dst)
    fields = {p: read_fields(*open_tags(str(p))) for p in paths if open_tags(str(p))}
    packets = {p: audio_fingerprint(str(p)) for p in paths}
    ds, pred = tmp_path / "ds", tmp_path / "pred"
    ingest(str(lib), str(ds), cfg(), progress=False)
    res = cli("classify", str(lib), "--model", str(run), "--out", str(pred), "--dataset", str(ds))
    assert not res.stderr.strip(), res.stderr[-3000:]  # a healthy run: no line from Ray or any library
    first = json.loads((pred / "classify.json").read_text())["last_run"]
    assert first["from_store"] == first["classified"] == len(picks)
    written = tag(str(pred), apply=True, progress=False)
    kinds = written["by_kind"]  # the person's three kept (or uncertain); the others given a genre (or uncertain)
    assert set(kinds) <= {"tagged", "new", "uncertain"} and kinds.get("new", 0) >= 1 and kinds.get("tagged", 0) >= 1
    for i, p in enumerate(paths):
        assert audio_fingerprint(str(p)) == packets[p], p  # tags written, audio packets as they were
        if i % 2:
            assert read_fields(*open_tags(str(p))) == fields[p], p
    again = classify(str(lib), str(run), str(pred), cfg(f"classify.dataset={json.dumps(str(ds))}"), progress=False)
    assert again["skipped_done"] == len(picks) and again["classified"] == 0
    re_ingest = ingest(str(lib), str(ds), cfg(), progress=False)
    assert (re_ingest.skipped_unchanged, re_ingest.processed) == (len(picks), 0)
    fresh = classify(str(lib), str(run), str(tmp_path / "pred2"), cfg(f"classify.dataset={json.dumps(str(ds))}"),
                     progress=False)  # a new predictions folder: the tagged files come from the store too
    assert fresh["from_store"] == len(picks)


def test_one_clip_runs_in_the_commands_own_process(run, library, tmp_path):
    """A classify of one new file starts no Ray: the engine gets the process's CPUs."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy2(sorted(library[0].rglob("*.wav"))[0], one / "clip.wav")
    res = cli("classify", str(one), "--model", str(run), "--out", str(tmp_path / "p"))
    assert not res.stderr.strip(), res.stderr[-3000:]
    last = json.loads((tmp_path / "p" / "classify.json").read_text())["last_run"]
    assert last["ran"] == "in this process" and last["processes"] == 1 and last["classified"] == 1
    assert last["engine"]["threads"] == len(os.sched_getaffinity(0))


# -- issue 28: labels from tags, unlabelled tracks, re-tagging, review, fill ----------------------------
def test_labels_come_from_a_persons_tags_through_the_vocabulary(library, dataset):
    _, _, truth = library
    ds, s = dataset
    tracks = Dataset(str(ds)).tracks()
    by_path_ = {e.path: e for e in tracks.values()}
    names = {"rock": "Rock", "electronic": "Electronic", "jazz": "Jazz"}
    for rel, t in truth.items():
        e = by_path_[rel]
        assert e.label == (names[t["genre"]] if t["tag"] else None), (rel, t["tag"], e.label)  # every spelling merged
        assert e.genre_tag == (t["tag"] or "") and e.album == t["album"] and e.album_artist == t["artist"]
        assert e.audio_fingerprint  # hashed while decoding
    assert (s.labelled, s.genres, s.unlabelled) == (12, 3, {"no genre tag": 12})
    manifest = Dataset(str(ds)).manifest()
    assert manifest["labels_from"]["unlabelled"] == {"no genre tag": 12}
    from genrecls.jobs.inspection import describe

    assert "12 labelled in 3 genres, 12 unlabelled: 12 without a genre tag (stored, never trained on)" in describe(
        Dataset(str(ds)))


def test_unlabelled_tracks_are_stored_and_embedded_but_never_trained_validated_or_tested(dataset, run):
    from genrecls.storage.embeddings import EmbeddingStore
    from genrecls.storage.split import read_splits

    ds, _ = dataset
    tracks = Dataset(str(ds)).tracks()
    unlabelled = {t for t, e in tracks.items() if e.label is None}
    assert len(unlabelled) == 12 and unlabelled <= set(EmbeddingStore(str(ds)).index())  # stored with embeddings
    assigned = set(read_splits(os.path.join(run, "splits.parquet")).column("track_id").to_pylist())
    assert assigned and not assigned & unlabelled  # no split holds them
    info = json.loads((run / "run.json").read_text())
    assert info["labels"] == ["Electronic", "Jazz", "Rock"] and info["labels_from"]["source"] == "tags"


def test_a_file_whose_tag_changes_is_relabelled_without_decoding_it_again(library, dataset, tmp_path):
    from genrecls.audio import write_person_tags
    from genrecls.jobs.ingest import ingest

    root, vocab, truth = library
    lib = tmp_path / "lib"
    shutil.copytree(root, lib)
    ds = copy_dataset(dataset[0], tmp_path, lib)
    rel = sorted(r for r, t in truth.items() if t["tag"] is None and t["genre"] == "jazz")[0]
    write_person_tags(str(lib / rel), genre=["Unknown", "jazz"])  # several values: the first that names a genre
    s = ingest(str(lib), str(ds), tags_cfg(vocab), progress=False)
    assert (s.processed, s.retagged, s.added, s.embedded_tracks, s.relabelled) == (1, 1, 0, 0, 1)
    e = next(e for e in Dataset(str(ds)).tracks().values() if e.path == rel)
    assert e.label == "Jazz" and e.genre_tag == "Unknown; jazz" and e.size == (lib / rel).stat().st_size
    # a new vocabulary relabels the library from the stored tags: nothing is read again
    (tmp_path / "v2.toml").write_text(VOCAB.replace('[genres.Rock]\naliases = ["Rock & Roll"]',
                                                    '[genres."Rock and more"]\naliases = ["Rock", "Rock & Roll"]'))
    s2 = ingest(str(lib), str(ds), tags_cfg(tmp_path / "v2.toml"), progress=False)
    assert s2.processed == 0 and s2.relabelled == 4  # the Rock album, under its new name
    assert {e.label for e in Dataset(str(ds)).tracks().values()} >= {"Rock and more", "Jazz"}


def test_review_lists_a_planted_contradiction_and_not_the_agreeing_files(library, dataset, run, tmp_path):
    """A file of one genre tagged as another by a person: review.csv lists it (the model hears its own genre with
    confidence), and none of the files whose tags agree; the file itself is left as it was."""
    import pyarrow.csv as pacsv

    from genrecls.audio import open_tags, read_fields, write_person_tags

    root, vocab, truth = library
    lib = tmp_path / "lib"
    shutil.copytree(root, lib)
    ds = copy_dataset(dataset[0], tmp_path, lib)
    planted = sorted(r for r, t in truth.items() if t["tag"] is None and t["genre"] == "electronic")[0]
    write_person_tags(str(lib / planted), genre=["Rock & Roll"])  # an electronic track a person tagged as Rock
    before = read_fields(*open_tags(str(lib / planted)))
    out = tmp_path / "pred"
    s = classify(str(lib), str(run), str(out), tags_cfg(vocab, f"classify.dataset={json.dumps(str(ds))}"),
                 progress=False)
    review = pacsv.read_csv(out / "review.csv").to_pylist()
    assert [r["path"] for r in review] == [planted], review
    assert review[0]["tagged"] == "Rock & Roll" and review[0]["tagged_genre"] == "Rock"
    assert review[0]["predicted_genre"] == "Electronic" and review[0]["tagged_probability"] < s["review"]["low"]
    assert s["review"]["tagged_tracks"] == 13 and read_fields(*open_tags(str(lib / planted))) == before


def test_a_label_with_too_few_tracks_is_left_out_by_name_or_refused(library, dataset, tmp_path):
    from genrecls.jobs.training import check_dataset
    from genrecls.jobs.training.plan import plan_training
    from genrecls.storage.dataset import DatasetError

    ds = Dataset(str(tmp_path / "ds"))
    shutil.copytree(dataset[0], tmp_path / "ds")
    one = next(t for t, e in ds.tracks().items() if e.label is None)
    ds.relabel({one: "Polka"})  # one track of a fourth genre
    c = cfg("train.min_tracks_per_label=2")
    plan, _ = plan_training(check_dataset(str(tmp_path / "ds"), c), c)
    assert plan.labels == ["Electronic", "Jazz", "Rock"]
    assert any("left out of training" in n and "'Polka' (1 track" in n for n in plan.notes), plan.notes
    refuse = cfg("train.min_tracks_per_label=2", "train.too_few=refuse")
    with pytest.raises(DatasetError, match="'Polka' \\(1 track\\)"):
        plan_training(check_dataset(str(tmp_path / "ds"), refuse), refuse)


def test_tag_variants_merge_and_a_vocabulary_error_names_its_line(tmp_path):
    from genrecls.models.vocabulary import VocabularyError, labels_from_tags, load_tag_vocabulary

    plain = load_tag_vocabulary(None)  # no vocabulary: spellings that normalise alike are one label
    labels, why, merged = labels_from_tags({"a": "Hip Hop", "b": "hip-hop", "c": "HIPHOP", "d": "Hip Hop",
                                            "e": "", "f": None, "g": "Jazz; Rock"}, plain)
    assert labels == {"a": "Hip Hop", "b": "Hip Hop", "c": "Hip Hop", "d": "Hip Hop", "e": None, "f": None, "g": "Jazz"}
    assert merged == {"Hip Hop": ["HIPHOP", "hip-hop"]} and why == {"e": "no genre tag", "f": "no genre tag"}
    (tmp_path / "v.toml").write_text(VOCAB)
    v = load_tag_vocabulary(tmp_path / "v.toml")
    assert [v.label_of(t)[0] for t in ("rock & roll", "ROCK", "electro", "jazz ", "Unknown", "Polka")] == \
        ["Rock", "Rock", "Electronic", "Jazz", None, "Polka"]
    assert v.label_of("Unknown")[1] == "dropped by the vocabulary: Unknown"
    (tmp_path / "bad.toml").write_text('[genres.Rock]\naliases = ["Pop"]\n\n[genres.Pop]\nparents = ["Rockk"]\n')
    with pytest.raises(VocabularyError, match=r"bad.toml: line 4: 'Pop' names two genres"):
        load_tag_vocabulary(tmp_path / "bad.toml")


def test_genres_genrecls_wrote_are_not_a_persons(tmp_path):
    """A file genrecls tagged (its provenance field says so) teaches nothing; what a person had before genrecls
    added to it (--add) stays the person's."""
    from genrecls.audio import new_fields, open_tags, read_track_tags, write_fields, write_person_tags
    from genrecls.audio.sample_data import synthesize, write_audio

    path = str(tmp_path / "t.flac")
    write_audio(path, synthesize("jazz", 2.0, sr=16000), 16000)
    fmt, _ = open_tags(path)
    write_fields(path, fmt, new_fields(fmt, ["Jazz"], {"v": 1, "model": "m", "genres": ["Jazz"], "written": ["Jazz"]}))
    assert read_track_tags(path).genres == () and read_track_tags(path).by_genrecls == ("Jazz",)
    write_person_tags(path, genre=["Bebop"])  # a person changed it: theirs now
    assert read_track_tags(path).genres == ("Bebop",)
    write_fields(path, fmt, new_fields(fmt, ["Bebop", "Jazz"], {"v": 1, "model": "m", "genres": ["Jazz"],
                                                                "written": ["Bebop", "Jazz"]}))  # genrecls --add
    assert read_track_tags(path).genres == ("Bebop",) and read_track_tags(path).by_genrecls == ("Jazz",)
