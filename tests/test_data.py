"""Input pipeline: batch format, packing invariants, determinism and resume, sharding, splits, input formats."""

import gzip
import json
import re

import numpy as np
import pytest

from deepseek_jax import data
from deepseek_jax.config import DataConfig
from deepseek_jax.data import DataError

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
  return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b, strict=True) for k in KEYS)


def _segments(batch):
  """Token lists of every packed document piece: its inputs plus, when it runs to the row end, the last target."""
  pieces = []
  for inp, tgt, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"]):
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      tokens = inp[idx].tolist()
      if idx[-1] == len(seg) - 1 and mask[-1]:
        tokens.append(int(tgt[-1]))
      pieces.append(tokens)
  return pieces


def _marked_corpus(tmp_path, n_docs=40, words=6):
  """A .txt corpus whose documents are tagged <id> so a decoded piece tells which document it came from."""
  rng = np.random.default_rng(0)
  vocab = ["thee", "thou", "hath", "doth", "wherefore", "art", "sweet", "love", "night", "sword"]
  docs = [f"<{i}> " + " ".join(rng.choice(vocab, size=words)) for i in range(n_docs)]
  path = tmp_path / "marked.txt"
  path.write_text("\n\n".join(docs) + "\n")
  return path, docs


def _doc_ids(batches):
  return {int(m) for b in batches for piece in _segments(b) for m in re.findall(r"<(\d+)>", bytes(piece).decode())}


# Batch format and packing invariants ------------------------------------------------------------------------

def test_shapes_dtypes_and_shift():
  batch = next(data.make_dataset(DataConfig(seq_len=64), batch_size=4))
  assert set(batch) == set(KEYS)
  for k in KEYS:
    assert batch[k].shape == (4, 64) and batch[k].dtype == np.int32, k
  # Inside one document, the target at t is the input at t + 1.
  both = (batch["loss_mask"][:, :-1] == 1)
  np.testing.assert_array_equal(batch["targets"][:, :-1][both], batch["inputs"][:, 1:][both])
  assert batch["inputs"].max() < 256 and batch["inputs"].min() >= 0


@pytest.mark.parametrize("seq_len", [16, 100])
def test_loss_mask_never_crosses_documents(tmp_path, seq_len):
  path, _ = _marked_corpus(tmp_path)
  for b in _take(data.make_dataset(DataConfig(path=str(path), seq_len=seq_len), batch_size=8), 6):
    seg, mask = b["segment_ids"], b["loss_mask"]
    assert set(np.unique(mask)) <= {0, 1}
    assert not mask[seg == 0].any(), "padding is never a loss position"
    # Where the next input starts another document (or padding), the target at t is not this document's.
    assert not mask[:, :-1][seg[:, :-1] != seg[:, 1:]].any()
    np.testing.assert_array_equal(seg[:, :-1][mask[:, :-1] == 1], seg[:, 1:][mask[:, :-1] == 1])


def test_positions_restart_per_document(tmp_path):
  path, _ = _marked_corpus(tmp_path)
  for b in _take(data.make_dataset(DataConfig(path=str(path), seq_len=100), batch_size=8), 4):
    assert (b["segment_ids"].max(axis=1) >= 2).any(), "rows should pack several documents"
    for seg, pos in zip(b["segment_ids"], b["positions"]):
      assert (pos[seg == 0] == 0).all()
      for s in np.unique(seg[seg > 0]):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
      assert list(np.unique(seg[starts][seg[starts] > 0])) == list(range(1, seg.max() + 1)), "ids are 1..n"


def test_pieces_are_document_text(tmp_path):
  path, docs = _marked_corpus(tmp_path)
  for piece in _segments(next(data.make_dataset(DataConfig(path=str(path), seq_len=32), batch_size=8))):
    text = bytes(piece).decode()
    assert sum(text in d for d in docs) >= 1, text


def test_long_documents_are_chunked_without_loss(tmp_path):
  """One eval pass predicts every token of every document except its first exactly once."""
  path = tmp_path / "long.txt"
  docs = ["x" * 1000, "short doc", "ab", "y" * 333, "z"]
  path.write_text("\n\n".join(docs))
  cfg = DataConfig(path=str(path), seq_len=37, val_fraction=0.99)   # all but one doc held out
  val_docs = data._shares(cfg, 0, 1)["val"].docs
  want_targets = val_docs.num_tokens - len(val_docs)
  batches = list(data.make_dataset(cfg, batch_size=3, split="val"))
  assert sum(int(b["loss_mask"].sum()) for b in batches) == want_targets
  assert all(b["inputs"].shape == (3, 37) for b in batches), "the last batch is padded to full size"


def test_eval_is_a_single_deterministic_pass():
  cfg = DataConfig(seq_len=128)
  first, second = list(data.make_dataset(cfg, batch_size=8, split="val")), \
      list(data.make_dataset(cfg, batch_size=8, split="val"))
  assert 0 < len(first) < 1000 and _same(first, second)


# Tokenizers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "To be, or not to be", "naïve café — 日本語 🎭\n\tend"])
def test_byte_tokenizer_round_trip(text):
  tok = data.make_tokenizer(DataConfig())
  ids = tok.encode(text)
  assert tok.vocab_size == data.vocab_size(DataConfig()) == 256
  assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_hf_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(["thee thou hath doth art"] * 3,
                          tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
  tok.save(str(tmp_path / "tokenizer.json"))
  path, _ = _marked_corpus(tmp_path)
  cfg = DataConfig(path=str(path), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=16)
  hf = data.make_tokenizer(cfg)
  assert isinstance(hf, data.HFTokenizer) and hf.vocab_size == data.vocab_size(cfg) == 6
  assert hf.decode(hf.encode("thou art")) == "thou art"
  batch = next(data.make_dataset(cfg, batch_size=2))
  assert batch["inputs"].max() < hf.vocab_size
  with pytest.raises(DataError, match="tokenizer file not found"):
    data.make_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")))


# Determinism and resume -------------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_differs():
  def run(seed):
    return _take(data.make_dataset(DataConfig(seq_len=32, seed=seed), batch_size=4), 3)
  assert _same(run(0), run(0))
  assert not _same(run(0), run(1))


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_resume_from_state_gives_identical_batches(steps):
  cfg = DataConfig(seq_len=48)
  it = data.make_dataset(cfg, batch_size=4)
  _take(it, steps)
  state = it.get_state()
  want = _take(it, 3)
  fresh = data.make_dataset(cfg, batch_size=4)
  fresh.set_state(state)
  assert _same(_take(fresh, 3), want)


def test_resume_across_epochs(tmp_path):
  path, _ = _marked_corpus(tmp_path, n_docs=10)   # ~2 batches per epoch: 25 steps cross many epochs
  cfg = DataConfig(path=str(path), seq_len=64)
  it = data.make_dataset(cfg, batch_size=4)
  epoch1 = _take(it, 2)
  _take(it, 23)
  state = it.get_state()
  want = _take(it, 4)
  fresh = data.make_dataset(cfg, batch_size=4)
  fresh.set_state(state)
  assert _same(_take(fresh, 4), want)
  epoch2 = _take(data.make_dataset(cfg, batch_size=4), 4)[2:]
  assert not _same(epoch1, epoch2), "each epoch is reshuffled"


def test_resume_with_worker_processes():
  cfg = DataConfig(seq_len=32, num_workers=2)
  it = data.make_dataset(cfg, batch_size=4)
  _take(it, 3)
  state = it.get_state()
  want = _take(it, 2)
  fresh = data.make_dataset(cfg, batch_size=4)
  fresh.set_state(state)
  assert _same(_take(fresh, 2), want)


# Sharding and splits ----------------------------------------------------------------------------------------

def _texts(docs: data.TokenizedDocs) -> list[str]:
  return [bytes(docs.tokens[docs.offsets[i]:docs.offsets[i + 1]]).decode() for i in range(len(docs))]


@pytest.mark.parametrize("kind", ["txt", "array_record"])
def test_each_process_reads_and_tokenizes_only_its_share(tmp_path, monkeypatch, kind):
  path, docs = _marked_corpus(tmp_path, n_docs=40)
  if kind == "array_record":
    from array_record.python.array_record_module import ArrayRecordWriter
    path = tmp_path / "marked.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for d in docs:
      writer.write(d.encode())
    writer.close()
  tokenized, records = [], []
  encode = data.ByteTokenizer.encode_batch
  monkeypatch.setattr(data.ByteTokenizer, "encode_batch", lambda self, texts: tokenized.extend(texts) or
                      encode(self, texts))

  class CountingSource(data.grain.sources.ArrayRecordDataSource):
    def __getitem__(self, i):
      records.append(i)
      return super().__getitem__(i)
  monkeypatch.setattr(data.grain.sources, "ArrayRecordDataSource", CountingSource)
  cfg = DataConfig(path=str(path), seq_len=32, val_fraction=0.2)
  # The split contract, independent of the pipeline: 8 val documents from a fixed permutation (seed 1234).
  val = set(np.random.default_rng(1234).permutation(40)[:8].tolist())
  want = {"train": [d for i, d in enumerate(docs) if i not in val], "val": [d for i, d in enumerate(docs) if i in val]}
  got = {}
  for p, n in ((0, 2), (1, 2), (0, 1)):
    tokenized.clear()
    records.clear()
    data._tokenized_share.cache_clear()
    got[p, n] = {s: _texts(share.docs) for s, share in data._shares(cfg, p, n).items()}
    mine = sorted(want["train"][p::n] + want["val"][p::n], key=docs.index)
    assert tokenized == mine, "a process tokenizes its own documents and no others"
    if kind == "array_record":
      assert records == [docs.index(d) for d in mine], "and reads only their records"
    assert got[p, n] == {s: want[s][p::n] for s in want}
  assert len(got[0, 2]["train"]) == len(got[1, 2]["train"]) == 16
  for s in ("train", "val"):   # the union of the two processes' shares is the 1-process corpus
    assert sorted(got[0, 2][s] + got[1, 2][s]) == sorted(got[0, 1][s]) == sorted(want[s])
  stats = data.corpus_stats(cfg, process_index=1, process_count=2)
  assert (stats["train_docs"], stats["val_docs"], stats["tokens_of"]) == (32, 8, "process 1 of 2")
  assert stats["train_tokens"] == sum(len(d.encode()) for d in want["train"][1::2])


def test_processes_get_disjoint_documents(tmp_path):
  path, _ = _marked_corpus(tmp_path)
  cfg = DataConfig(path=str(path), seq_len=128, val_fraction=0.1)
  n_train = data.corpus_stats(cfg)["train_docs"]
  seen = [_doc_ids(_take(data.make_dataset(cfg, batch_size=4, process_index=p, process_count=2), 12))
          for p in range(2)]
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == n_train, "together the processes cover the train split"


def test_train_and_val_are_disjoint(tmp_path):
  path, docs = _marked_corpus(tmp_path)
  cfg = DataConfig(path=str(path), seq_len=128, val_fraction=0.2)
  stats = data.corpus_stats(cfg)
  assert (stats["train_docs"], stats["val_docs"]) == (32, 8)
  assert stats["train_tokens"] + stats["val_tokens"] == sum(len(d.encode()) for d in docs)
  val = _doc_ids(data.make_dataset(cfg, batch_size=4, split="val"))
  train = _doc_ids(_take(data.make_dataset(cfg, batch_size=4), 12))
  assert len(val) == 8 and len(train) == 32 and not val & train


def test_bundled_corpus_stats():
  stats = data.corpus_stats(DataConfig())
  assert stats["train_docs"] > 500 and stats["val_docs"] > 5
  assert stats["train_tokens"] > 2_000_000 and stats["vocab_size"] == 256


# Input formats ----------------------------------------------------------------------------------------------

def test_txt_jsonl_array_record_and_directory(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n  second doc  \n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"body": "third"}) + "\n\n" + json.dumps({"body": "fourth é"}) + "\n")
  with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
    f.write(json.dumps({"body": "fifth"}) + "\n")
  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for text in ["sixth", "seventh ☃"]:
    writer.write(text.encode("utf-8"))
  writer.close()
  (tmp_path / "notes.md").write_text("not data")
  cases = {"a.txt": ["first doc\nline two", "second doc"], "b.jsonl": ["third", "fourth é"],
           "c.jsonl.gz": ["fifth"], "d.array_record": ["sixth", "seventh ☃"]}
  for name, want in cases.items():
    assert data.load_documents(DataConfig(path=str(tmp_path / name), jsonl_field="body")) == want, name
  everything = sum(cases.values(), [])
  cfg = DataConfig(path=str(tmp_path), jsonl_field="body", seq_len=8, val_fraction=0.0)
  assert data.load_documents(cfg) == everything
  assert data.corpus_stats(cfg)["train_tokens"] == sum(len(d.encode()) for d in everything)
  assert next(data.make_dataset(cfg, batch_size=2))["inputs"].shape == (2, 8)


def _raises(cfg, pattern, **kwargs):
  with pytest.raises(DataError, match=pattern) as info:
    data.make_dataset(cfg, batch_size=2, **kwargs)
  assert "\n" not in str(info.value), "errors are one line"


def test_bad_inputs_raise_clear_errors(tmp_path):
  _raises(DataConfig(path=str(tmp_path / "nope.txt")), r"data.path not found: .*nope\.txt")
  (tmp_path / "x.csv").write_text("a,b\n")
  _raises(DataConfig(path=str(tmp_path / "x.csv")), r"unknown file extension '\.csv'")
  (tmp_path / "empty.txt").write_text("\n  \n\n")
  _raises(DataConfig(path=str(tmp_path / "empty.txt")), "corpus is empty")
  (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
  _raises(DataConfig(path=str(tmp_path / "nofield.jsonl")), r"nofield\.jsonl:2: no field 'text'")
  (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": "oops"\n')
  _raises(DataConfig(path=str(tmp_path / "broken.jsonl")), r"broken\.jsonl:3: invalid JSON")
  (tmp_path / "notstr.jsonl").write_text('{"text": 3}\n')
  _raises(DataConfig(path=str(tmp_path / "notstr.jsonl")), r"notstr\.jsonl:1: field 'text' is int")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  _raises(DataConfig(path=str(tmp_path / "latin1.txt")), "not valid UTF-8")
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "README.md").write_text("hi")
  _raises(DataConfig(path=str(tmp_path / "docs")), "directory has no")
  (tmp_path / "one.txt").write_text("a single document")
  _raises(DataConfig(path=str(tmp_path / "one.txt")), r"val split has 0 documents.*val_fraction", split="val")
  _raises(DataConfig(val_fraction=1.0), r"val_fraction=1.0 must be in \[0, 1\)")
  _raises(DataConfig(), "split='test'", split="test")
  _raises(DataConfig(), r"process_index=2 is not in \[0, process_count=2\)", process_index=2, process_count=2)
