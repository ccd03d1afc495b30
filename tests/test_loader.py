"""Tests for the BOS-aligned best-fit packing loader (model/data.py, docs/model.md#data-loader).

The packing rule is checked on hand-built token lists through ``pack_rows``; everything else
runs the real loader on the real shards in ../shared/data/pretrain with a small tokenizer
(vocab 512) trained once per module, and re-tokenises the shard to check what the rows hold.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.data import iter_documents
from model.dataloader import BestFitLoader, LoaderStats, pack_rows, stage_rows, val_loader
from model.tokenizer import Tokenizer, train_tokenizer, training_texts

PRETRAIN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain"
SHARDS = [PRETRAIN_DIR / f"shard_{i:05d}.parquet" for i in range(8)]
SHARD = SHARDS[0]  # 5 row groups: 1024, 1024, 1024, 1024, 588 documents


@pytest.fixture(scope="module")
def shards() -> list[Path]:
    missing = [p.name for p in SHARDS if not p.is_file()]
    if missing:
        pytest.skip(f"pretraining shards not found in {PRETRAIN_DIR} (missing {missing[:3]})")
    return SHARDS


@pytest.fixture(scope="module")
def tokenizer(shards) -> Tokenizer:
    return train_tokenizer(training_texts(iter_documents([SHARD]), max_chars=1_000_000, doc_cap=10_000), 512)


@pytest.fixture(scope="module")
def shard_docs(tokenizer) -> list[list[tuple[int, ...]]]:
    """The documents of each row group of SHARD, tokenised as the loader does (BOS first)."""
    parquet = pq.ParquetFile(SHARD)
    bos = tokenizer.get_bos_token_id()
    groups = [parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist() for rg in range(parquet.num_row_groups)]
    return [[tuple(ids) for ids in tokenizer.encode(texts, prepend=bos)] for texts in groups]


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected)
    for i, ((x, y), (ex, ey)) in enumerate(zip(got, expected)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"batch {i} differs"


def segments(row: list[int], bos: int) -> list[tuple[int, ...]]:
    """A packed row cut before every BOS: one piece per document."""
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def rows_of(batch) -> list[list[int]]:
    """The B x (T+1) packed rows behind (inputs, targets)."""
    inputs, targets = batch
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def check_row(row, bos, shard_docs, groups: set[int]) -> None:
    """A row is whole documents of SHARD's row groups ``groups``, the last possibly a prefix."""
    whole = {doc: rg for rg, docs in enumerate(shard_docs) for doc in docs}
    pieces = segments(row, bos)
    assert pieces and pieces[0][0] == bos, "row does not start with BOS"
    for piece in pieces[:-1]:
        assert piece in whole, "a document inside a row is not a whole tokenised document"
        assert whole[piece] in groups, f"document from row group {whole[piece]}, expected one of {groups}"
    last = pieces[-1]
    assert any(doc[: len(last)] == last for rg in groups for doc in shard_docs[rg]), (
        f"the last document of a row is not a prefix of a tokenised document of row groups {groups}"
    )


# --- the packing rule on hand-built documents ---------------------------------------------------


def test_pack_rows_best_fit_ties_and_crop():
    a, b, c, d = [0, 1, 1], [0, 2], [0, 3, 3, 3], [0, 4, 4, 4]
    e, f = [0] + [5] * 11, [0, 6, 6]
    buffer = [a, b, c, d, e, f]
    stats = LoaderStats()
    rows = pack_rows(buffer, B=2, T=9, stats=stats)  # capacity 10 per row
    # Row 1: room 10 -> c (4; d is as long but later), room 6 -> d (4), room 2 -> b (exactly 2).
    # Row 2: room 10 -> a (3; f is as long but later), room 7 -> f, room 4 -> only e (12) is
    # left and it does not fit: crop it to its first 4 tokens, 8 tokens thrown away.
    assert rows == [c + d + b, a + f + e[:4]]
    assert buffer == []
    assert stats == LoaderStats(documents_consumed=6, tokens_consumed=28, tokens_cropped=8)
    assert stats.cropped_fraction == pytest.approx(8 / 28)


def test_pack_rows_longest_fit_and_shortest_crop_ties():
    x, y, z, w = [0, 1, 1], [0] + [2] * 5, [0] + [3] * 7, [0] + [4] * 7
    buffer = [x, y, z, w]
    # Capacity 7: the longest that fits is y (6), not the earlier x; room 1: nothing fits, so
    # the shortest document (x) is cropped to its BOS.
    assert pack_rows(buffer, B=1, T=6) == [y + [0]]
    assert buffer == [z, w]
    # Capacity 5: nothing fits; z and w are equally short, the earlier (z) is cropped.
    assert pack_rows(buffer, B=1, T=4) == [z[:5]]
    assert buffer == [w]


def test_pack_rows_refills_below_buffer_size():
    slices = iter([[[0, 1], [0, 2, 2], [0, 3, 3, 3]], [[0, 4, 4, 4, 4], [0, 5], [0, 6, 6]], [[0, 7]]])
    calls = []

    def refill():
        calls.append(1)
        return next(slices)

    buffer: list[list[int]] = []
    # Before the first pick two slices are read (3 < 4 documents after one); capacity 6:
    # [0,4,4,4,4] (5) fits best, then room 1: crop the shortest, [0,1], to its BOS. The buffer
    # still holds 5 >= 4 documents at the second pick, so no third refill.
    rows = pack_rows(buffer, B=1, T=5, refill=refill, buffer_size=4)
    assert rows == [[0, 4, 4, 4, 4, 0]]
    assert len(calls) == 2
    assert buffer == [[0, 2, 2], [0, 3, 3, 3], [0, 5], [0, 6, 6]]


def test_pack_rows_without_refill_runs_out():
    with pytest.raises(ValueError, match="ran out"):
        pack_rows([[0, 1, 1]], B=2, T=3)


# --- the loader on real shards ------------------------------------------------------------------


def test_batches_are_packed_whole_documents(tokenizer, shard_docs):
    B, T = 4, 300
    loader = BestFitLoader(tokenizer, [SHARD], B, T, streams=[1], num_streams=3, buffer_size=50)
    bos = tokenizer.get_bos_token_id()
    for _ in range(8):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.device.type == "cpu"
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert (inputs[:, 0] == bos).all()
        for row in rows_of((inputs, targets)):
            check_row(row, bos, shard_docs, {1, 4})  # stream 1 of 3 reads row groups 1 and 4 only


def test_token_utilisation_is_counted(tokenizer):
    B, T, n = 2, 512, 12
    loader = BestFitLoader(tokenizer, [SHARD], B, T, streams=[0], num_streams=1, buffer_size=100)
    batches = take(loader, n)
    stats = loader.stats
    bos = tokenizer.get_bos_token_id()
    bos_count = sum(int((x == bos).sum()) + int((y[:, -1] == bos).sum()) for x, y in batches)
    assert stats.batches == n
    assert stats.tokens_yielded == n * B * T
    assert stats.tokens_consumed == stats.tokens_cropped + n * B * (T + 1)
    assert stats.documents_consumed == bos_count  # each document, whole or cropped, brings one BOS
    assert 0 < loader.cropped_fraction < 1
    assert loader.cropped_fraction == stats.tokens_cropped / stats.tokens_consumed


def test_stage_rows_layout():
    staged = stage_rows(torch.arange(12).view(2, 6))  # the host side of the one copy per batch
    assert staged.shape == (2, 2, 5) and staged.dtype == torch.int64 and staged.is_contiguous()
    assert staged[0].tolist() == [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]
    assert staged[1].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]


def test_batches_are_fresh_tensors(tokenizer):
    loader = BestFitLoader(tokenizer, [SHARD], 2, 64, streams=[0], num_streams=1, buffer_size=20)
    first = next(loader)
    kept = [t.clone() for t in first]
    second = next(loader)
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])
    assert first[0].data_ptr() != second[0].data_ptr()


def test_exact_resume_through_a_file(tokenizer, shards, tmp_path):
    make = lambda state=None: BestFitLoader(tokenizer, shards[:7], 4, 256, streams=[0], num_streams=1, state=state)
    loader = make()
    take(loader, 7)
    torch.save(loader.state_dict(), tmp_path / "loader.pt")
    expected = take(loader, 5)
    state = torch.load(tmp_path / "loader.pt", weights_only=True)
    resumed = make(state)
    assert_same_batches(take(resumed, 5), expected)
    assert resumed.stats == loader.stats
    assert resumed.step == loader.step == 12


def test_exact_resume_across_an_epoch_boundary(tokenizer):
    # Stream 4 of 5 reads only row group 4 of one file (588 documents): an epoch every ~20 batches.
    make = lambda state=None: BestFitLoader(
        tokenizer, [SHARD], 8, 1024, streams=[4], num_streams=5, buffer_size=100, state=state
    )
    loader = make()
    batches, states = [], [loader.state_dict()]
    first_epoch2_batch = None  # the batch whose refills read the first documents of epoch 2
    while first_epoch2_batch is None or len(batches) < first_epoch2_batch + 5:
        assert len(batches) < 100, "the stream never started a second epoch"
        batches.append(next(loader))
        states.append(loader.state_dict())
        cursor = states[-1]["stream_states"][0]
        if first_epoch2_batch is None and cursor["epoch"] == 2 and cursor["offset"] > 0:
            first_epoch2_batch = len(batches) - 1
    assert loader.epochs == [2]
    for start in range(len(batches) - 4):  # states[i] is the state before batch i
        assert_same_batches(take(make(states[start]), 5), batches[start : start + 5])


def write_shard(path: Path, name: str, row_group_sizes: list[int]) -> list[list[str]]:
    """A small shard whose documents say where they are: '<name><row group>.<row> ...'."""
    groups = [[f"{name}{rg}.{i} lorem ipsum" for i in range(n)] for rg, n in enumerate(row_group_sizes)]
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for texts in groups:
            writer.write_table(pa.table({"text": texts}, schema=schema))
    assert [len(g) for g in groups] == [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(len(groups))]
    return groups


def test_stream_reads_its_row_groups_in_order_and_resumes_mid_group(tokenizer, tmp_path):
    a = write_shard(tmp_path / "a.parquet", "a", [3, 3, 3, 2, 1])
    write_shard(tmp_path / "b.parquet", "b", [2, 2])
    c = write_shard(tmp_path / "c.parquet", "c", [1, 2, 3])
    paths = [tmp_path / f"{name}.parquet" for name in "abc"]
    # Stream 2 of 3: row group 2 of a, nothing of b (2 row groups), row group 2 of c; then again.
    one_epoch = a[2] + c[2]
    # One-document slices and a one-document buffer: documents are packed in the order read.
    make = lambda state=None: BestFitLoader(
        tokenizer, paths, 1, 12, streams=[2], num_streams=3, buffer_size=1, slice_docs=1, state=state
    )
    loader = make()
    bos = tokenizer.get_bos_token_id()
    batches, states, epochs = [], [loader.state_dict()], []
    while loader.stats.documents_consumed < 3 * len(one_epoch):
        batches.append(next(loader))
        states.append(loader.state_dict())
        epochs.append(loader.epochs[0])
    pieces = [tokenizer.decode(list(p[1:])) for batch in batches for row in rows_of(batch) for p in segments(row, bos)]
    expected = (one_epoch * 4)[: len(pieces)]
    assert all(text.startswith(piece) for piece, text in zip(pieces, expected)), (pieces, expected)
    assert {1, 2, 3} <= set(epochs)
    offsets = {s["stream_states"][0]["offset"] for s in states}
    assert {1, 2} <= offsets  # some states point into the middle of a row group
    for start in range(len(batches) - 2):
        assert_same_batches(take(make(states[start]), 3), batches[start : start + 3])


def test_exact_resume_with_interleaved_streams(tokenizer, shards):
    make = lambda state=None: BestFitLoader(
        tokenizer, shards[:2], 3, 200, streams=[0, 1], num_streams=2, buffer_size=200, state=state
    )
    loader = make()
    take(loader, 7)  # odd: the next micro-batch comes from stream 1
    state = loader.state_dict()
    expected = take(loader, 5)
    assert_same_batches(take(make(state), 5), expected)


def test_two_streams_interleave_like_two_ranks(tokenizer, shards):
    kwargs = dict(num_streams=2, buffer_size=200)
    both = take(BestFitLoader(tokenizer, shards[:3], 2, 128, streams=[0, 1], **kwargs), 4)
    rank0 = take(BestFitLoader(tokenizer, shards[:3], 2, 128, streams=[0], **kwargs), 2)
    rank1 = take(BestFitLoader(tokenizer, shards[:3], 2, 128, streams=[1], **kwargs), 2)
    assert_same_batches(both, [rank0[0], rank1[0], rank0[1], rank1[1]])


def test_streams_read_disjoint_row_groups(tokenizer, shard_docs):
    bos = tokenizer.get_bos_token_id()
    seen = []
    for stream in (0, 1):
        loader = BestFitLoader(tokenizer, [SHARD], 4, 512, streams=[stream], num_streams=2, buffer_size=300)
        docs = set()
        for batch in take(loader, 6):
            for row in rows_of(batch):
                check_row(row, bos, shard_docs, set(range(stream, 5, 2)))
                docs.update(segments(row, bos)[:-1])
        seen.append(docs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mismatched_state_is_rejected(tokenizer, shards):
    loader = BestFitLoader(tokenizer, shards[:2], 2, 64, streams=[0], num_streams=1, buffer_size=20)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="B is 2 in the state but 3 here"):
        BestFitLoader(tokenizer, shards[:2], 3, 64, streams=[0], num_streams=1, buffer_size=20, state=state)
    with pytest.raises(ValueError, match="files"):
        BestFitLoader(tokenizer, shards[1:3], 2, 64, streams=[0], num_streams=1, buffer_size=20, state=state)
    with pytest.raises(ValueError, match="num_streams"):
        BestFitLoader(tokenizer, shards[:2], 2, 64, streams=[0], num_streams=2, buffer_size=20, state=state)
    with pytest.raises(ValueError, match="not a BestFitLoader state"):
        BestFitLoader(tokenizer, shards[:2], 2, 64, streams=[0], num_streams=1, state={"epoch": 1})


def test_bad_arguments_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="shards stage"):
        BestFitLoader(tokenizer, [], 2, 64, streams=[0], num_streams=1)
    with pytest.raises(ValueError, match="gets no documents"):  # the shard has 5 row groups
        BestFitLoader(tokenizer, [SHARD], 2, 64, streams=[5], num_streams=6)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        BestFitLoader(tokenizer, [SHARD], 2, 64, streams=[2], num_streams=2)
    with pytest.raises(FileNotFoundError, match="shards stage"):
        BestFitLoader(tokenizer, [SHARD.with_name("missing.parquet")], 2, 64, streams=[0], num_streams=1)


def test_val_loader_is_the_same_every_time(tokenizer, shards):
    val = shards[-1]
    first = take(val_loader(tokenizer, val, 2, 128, rank=0, world_size=2, device="cpu"), 3)
    assert_same_batches(take(val_loader(tokenizer, val, 2, 128, rank=0, world_size=2, device="cpu"), 3), first)
    other = next(val_loader(tokenizer, val, 2, 128, rank=1, world_size=2, device="cpu"))
    assert not torch.equal(other[0], first[0][0])
    explicit = BestFitLoader(tokenizer, [val], 2, 128, streams=[0], num_streams=2)
    assert_same_batches(take(explicit, 3), first)


def test_state_is_plain_data(tokenizer):
    loader = BestFitLoader(tokenizer, [SHARD], 2, 64, streams=[0], num_streams=1, buffer_size=20)
    next(loader)
    state = loader.state_dict()
    (stream_state,) = state["stream_states"]
    assert stream_state["buffer_tokens"].dtype == torch.int32
    assert int(stream_state["buffer_lengths"].sum()) == stream_state["buffer_tokens"].numel()
    assert len(stream_state["buffer_lengths"]) >= 20 - 1  # refilled to 20 before the last pick
    assert (stream_state["file_index"], stream_state["row_group"], stream_state["epoch"]) == (0, 0, 1)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)
