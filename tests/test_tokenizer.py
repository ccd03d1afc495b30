"""Tests for model/tokenizer.py and model/tok_eval.py on the real pretraining shards in ../shared/data/pretrain.

One tokenizer (vocab 2048, ~2M characters of the train shards) is trained per module and
shared, so the suite stays fast on two CPU cores.
"""

import itertools
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiktoken.load
import torch

from model.tok_eval import EVAL_TEXTS, evaluate_tokenizer, format_evaluation, load_baseline_encoding
from model.tokenizer import (
    SANITY_TEXT,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    load_token_bytes,
    train_tokenizer,
    training_texts,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAIN_DIR = DATA_DIR / "pretrain"
TRAIN_SHARDS = [PRETRAIN_DIR / f"shard_{i:05d}.parquet" for i in range(7)]
VAL_SHARD = PRETRAIN_DIR / "shard_00007.parquet"
VOCAB_SIZE = 2048


def read_documents(path: Path):
    """Documents of one shard, row group by row group (the loader's order)."""
    parquet = pq.ParquetFile(path)
    for group in range(parquet.num_row_groups):
        yield from parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()


def first_row_group(path: Path) -> list[str]:
    return pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist()


@pytest.fixture(scope="module")
def shards():
    missing = [p.name for p in TRAIN_SHARDS + [VAL_SHARD] if not p.is_file()]
    if missing:
        pytest.skip(f"pretraining shards not found in {PRETRAIN_DIR} (missing {missing[:3]})")
    return PRETRAIN_DIR


@pytest.fixture(scope="module")
def tokenizer(shards) -> Tokenizer:
    documents = itertools.chain(read_documents(TRAIN_SHARDS[0]), read_documents(TRAIN_SHARDS[1]))
    return train_tokenizer(training_texts(documents, max_chars=2_000_000, doc_cap=10_000), VOCAB_SIZE)


@pytest.fixture(scope="module")
def val_documents(shards) -> list[str]:
    return list(read_documents(VAL_SHARD))


# --- training --------------------------------------------------------------------------------


def test_round_trip_every_validation_document(tokenizer, val_documents):
    assert len(val_documents) > 4000  # the whole shard, not a sample
    rows = tokenizer.encode(val_documents)
    assert len(rows) == len(val_documents)
    failures = [i for i, (ids, doc) in enumerate(zip(rows, val_documents)) if tokenizer.decode(ids) != doc]
    assert not failures, f"{len(failures)} documents do not round-trip, first index {failures[0]}"
    # Batch and single encoding agree.
    assert rows[0] == tokenizer.encode(val_documents[0])


def test_round_trip_fixed_texts(tokenizer):
    for label, text in {"sanity": SANITY_TEXT, **EVAL_TEXTS}.items():
        assert tokenizer.decode(tokenizer.encode(text)) == text, label


def test_split_pattern_groups_digits_by_two(tokenizer):
    assert r"\p{N}{1,2}" in SPLIT_PATTERN
    ids = tokenizer.encode("12345")
    # Chunks "12", "34", "5": merges never cross chunks, so at least three tokens.
    assert len(ids) >= 3
    assert b"".join(tokenizer.decode_single_token_bytes(i) for i in ids) == b"12345"
    assert all(len(tokenizer.decode_single_token_bytes(i)) <= 2 for i in ids)


def test_special_token_ids_follow_mergeable_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    n_mergeable = VOCAB_SIZE - len(SPECIAL_TOKENS)
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode_special(token) == n_mergeable + offset
    assert tokenizer.get_bos_token_id() == n_mergeable
    assert tokenizer.encode_special("<|output_end|>") == VOCAB_SIZE - 1
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)


def test_special_tokens_are_not_recognised_in_text(tokenizer):
    bos = tokenizer.get_bos_token_id()
    ids = tokenizer.encode("before <|bos|> after <|assistant_end|>")
    assert len(ids) > 2
    assert not set(ids) & {tokenizer.encode_special(t) for t in SPECIAL_TOKENS}
    assert tokenizer.decode(tokenizer.encode("<|bos|>")) == "<|bos|>"
    assert bos not in tokenizer.encode("<|bos|>")


def test_prepend_append_and_input_types(tokenizer):
    bos = tokenizer.get_bos_token_id()
    end = tokenizer.encode_special("<|assistant_end|>")
    plain = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", prepend="<|bos|>", append=end) == [bos, *plain, end]
    assert tokenizer("hello world", prepend=bos) == [bos, *plain]
    batch = tokenizer.encode(["hello world", "", "bye"], prepend=bos, append="<|assistant_end|>")
    assert batch[0] == [bos, *plain, end]
    assert batch[1] == [bos, end]
    assert tokenizer.encode([]) == []
    with pytest.raises(TypeError):
        tokenizer.encode(b"bytes are not text")
    with pytest.raises(TypeError):
        tokenizer.encode("x", prepend=1.5)
    with pytest.raises(KeyError):
        tokenizer.encode("x", prepend="<|not_special|>")
    assert tokenizer.id_to_token(bos) == "<|bos|>"


def test_training_is_deterministic(shards):
    documents = list(training_texts(read_documents(TRAIN_SHARDS[2]), max_chars=300_000, doc_cap=10_000))
    first = train_tokenizer(documents, 600)
    second = train_tokenizer(iter(documents), 600)
    vocab = [first.decode_single_token_bytes(i) for i in range(first.get_vocab_size())]
    assert vocab == [second.decode_single_token_bytes(i) for i in range(second.get_vocab_size())]
    sample = documents[-1][:2000] + SANITY_TEXT
    assert first.encode(sample) == second.encode(sample)


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], 256 + len(SPECIAL_TOKENS) - 1)
    # The minimum: 256 byte tokens and no merges at all.
    smallest = train_tokenizer(["some text"], 256 + len(SPECIAL_TOKENS))
    assert smallest.get_vocab_size() == 265
    assert smallest.encode("ab") == [ord("a"), ord("b")]


def test_tiny_corpus_stops_merging_early():
    # "ab ab ab" has chunks "ab" and " ab": two merges exhaust every pair, so the vocabulary
    # is smaller than asked and the special tokens follow the 258 real mergeable tokens.
    tok = train_tokenizer(["ab ab ab"], 300)
    assert tok.get_vocab_size() == 258 + len(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == 258
    assert tok.encode(" ab") == [257]


# --- training_texts --------------------------------------------------------------------------


def test_training_texts_crop_and_stop():
    pulled = []

    def documents():
        for doc in ["aaaa", "bbbbbbbbbb", "cc", "ddddddd", "eee"]:
            pulled.append(doc)
            yield doc

    texts = list(training_texts(documents(), max_chars=10, doc_cap=6))
    # Running totals after cropping: 4, 10 (not > 10, go on), 12 (> 10: yielded, then stop).
    assert texts == ["aaaa", "bbbbbb", "cc"]
    assert len(pulled) == 3  # the stream is not read past the stopping document


def test_training_texts_includes_the_crossing_document():
    texts = list(training_texts(["x" * 5, "y" * 20, "z"], max_chars=7, doc_cap=100))
    assert texts == ["x" * 5, "y" * 20]  # 5, then 25 > 7: the crossing document is kept whole
    assert list(training_texts(["abc"] * 3, max_chars=100, doc_cap=2)) == ["ab"] * 3  # stream ran out
    with pytest.raises(ValueError):
        list(training_texts(["abc"], max_chars=0, doc_cap=10))


def test_training_texts_on_real_shard(shards):
    texts = list(training_texts(read_documents(TRAIN_SHARDS[0]), max_chars=100_000, doc_cap=1_000))
    assert all(len(t) <= 1_000 for t in texts)
    total = sum(map(len, texts))
    assert total > 100_000 and total - len(texts[-1]) <= 100_000


# --- persistence -----------------------------------------------------------------------------


def test_save_load_round_trip(tokenizer, val_documents, tmp_path, monkeypatch):
    tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    assert not list(tmp_path.rglob("*.pkl"))

    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    n_mergeable = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert meta == {
        "format": 1,
        "pattern": SPLIT_PATTERN,
        "special_tokens": {t: n_mergeable + i for i, t in enumerate(SPECIAL_TOKENS)},
        "vocab_size": VOCAB_SIZE,
    }
    # tiktoken can read the ranks file itself (its file cache disabled, it keys on the path).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken"))
    assert len(ranks) == n_mergeable
    assert all(tokenizer.decode_single_token_bytes(rank) == token for token, rank in ranks.items())

    loaded = Tokenizer.load(tmp_path)
    assert loaded.get_vocab_size() == VOCAB_SIZE
    assert loaded.get_bos_token_id() == tokenizer.get_bos_token_id()
    sample = val_documents[:200] + list(EVAL_TEXTS.values()) + [SANITY_TEXT]
    assert loaded.encode(sample) == tokenizer.encode(sample)


def test_token_bytes_are_raw_byte_lengths(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    token_bytes = load_token_bytes(tmp_path)
    assert token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes.dtype == torch.int32 and token_bytes.device.type == "cpu"
    n_mergeable = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert token_bytes[n_mergeable:].tolist() == [0] * len(SPECIAL_TOKENS)
    expected = [len(tokenizer.decode_single_token_bytes(i)) for i in range(n_mergeable)]
    assert token_bytes[:n_mergeable].tolist() == expected
    assert token_bytes.min().item() == 0 and token_bytes[:n_mergeable].min().item() >= 1


def is_valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_token_bytes_of_tokens_that_are_not_utf8(tokenizer, tmp_path):
    # The shared 2048 vocab (mostly English) may merge no partial characters, so train one on
    # Korean, where the first merges join two of a syllable's three UTF-8 bytes.
    korean = train_tokenizer([EVAL_TEXTS["korean"]] * 4, 300)
    korean.save(tmp_path)
    token_bytes = load_token_bytes(tmp_path)
    for tok in (tokenizer, korean):  # lone bytes 0x80-0xFF are never valid UTF-8
        assert not any(is_valid_utf8(tok.decode_single_token_bytes(b)) for b in range(0x80, 0x100))
    n_mergeable = korean.get_vocab_size() - len(SPECIAL_TOKENS)
    merged = [i for i in range(256, n_mergeable) if not is_valid_utf8(korean.decode_single_token_bytes(i))]
    assert merged, "training on Korean should merge partial characters"
    for token_id in [0x80, *merged]:
        raw = korean.decode_single_token_bytes(token_id)
        assert token_bytes[token_id].item() == len(raw)
        # Decoding to str and re-encoding would count U+FFFD (3 bytes) instead.
        assert len(korean.id_to_token(token_id).encode("utf-8")) != len(raw)


def test_save_overwrites_atomically(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    other = train_tokenizer(["ab ab ab"], 300)
    other.save(tmp_path)  # replaces every file; no temp files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    assert Tokenizer.load(tmp_path).get_vocab_size() == other.get_vocab_size()
    assert load_token_bytes(tmp_path).shape == (other.get_vocab_size(),)


def test_load_missing_files_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer stage"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"token_bytes\.pt.*tokenizer stage"):
        load_token_bytes(tmp_path)


def test_builtin_encodings_are_not_saved(tmp_path):
    encoding, reason = load_baseline_encoding("gpt2")
    if encoding is None:
        pytest.skip(f"tiktoken gpt2 unavailable (offline?): {reason}")
    gpt2 = Tokenizer.from_pretrained("gpt2")
    assert gpt2.get_bos_token_id() == 50256 and gpt2.get_vocab_size() == 50257
    with pytest.raises(ValueError):
        gpt2.save(tmp_path)


# --- evaluation ------------------------------------------------------------------------------


def test_evaluate_tokenizer(tokenizer, shards):
    texts = {**EVAL_TEXTS, "val": "\n".join(first_row_group(VAL_SHARD))}
    started = time.monotonic()
    results = evaluate_tokenizer(tokenizer, texts)
    assert time.monotonic() - started < 60  # two baselines, each bounded by a 20 s deadline
    assert list(results) == list(texts)
    for label, text in texts.items():
        ours = results[label]["ours"]
        assert ours["bytes"] == len(text.encode("utf-8"))
        assert ours["tokens"] == len(tokenizer.encode(text))
        assert ours["ratio"] == pytest.approx(ours["bytes"] / ours["tokens"])
        for name in ("gpt2", "cl100k_base"):
            baseline = results[label][name]
            if not baseline["available"]:  # offline: recorded, not raised
                assert baseline["reason"]
                continue
            diff = (baseline["tokens"] - ours["tokens"]) / baseline["tokens"] * 100
            assert baseline["relative_diff_pct"] == pytest.approx(diff)
            assert baseline["better"] in ("ours", name, "Tie")
    # Trained on this corpus, ours compresses its validation text well (English: > 2.5 bytes/token).
    assert results["val"]["ours"]["ratio"] > 2.5
    table = format_evaluation(results)
    assert "ours vs gpt2" in table and "| val |" in table


def test_unknown_baseline_is_unavailable_not_an_error():
    encoding, reason = load_baseline_encoding("no_such_encoding")
    assert encoding is None and "no_such_encoding" in reason
