"""The stdlib language-modelling task: tokenizer, corpus, GPT, training and the pretraining cache."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import re
import warnings

import pytest
import torch

from stamen.tasks.lm import (
    GPT,
    ByteTokenizer,
    CorpusError,
    GPTConfig,
    evaluate_lm,
    hf_causal_lm,
    lm_batches,
    load_hf_text_dataset,
    pretrain,
    stdlib_corpus,
    texts_to_tokens,
    train_lm,
)

TINY = GPTConfig(context=32, n_layer=1, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_bytes_per_client=60_000, max_pretrain_bytes=60_000, max_test_bytes=40_000)


# -- tokenizer ------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert tok.decode_bytes(tok.encode(b"\x00\xff")) == b"\x00\xff"


def test_byte_tokenizer_specials():
    tok = ByteTokenizer(bos=True, eos=True)
    ids = tok.encode("ab")
    assert ids == [256, 97, 98, 257] and tok.vocab_size == 258
    assert tok.decode(ids) == "ab"
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([300])


# -- corpus ----------------------------------------------------------------------------------


def test_corpus_is_deterministic(corpus):
    again = stdlib_corpus(max_bytes_per_client=60_000, max_pretrain_bytes=60_000, max_test_bytes=40_000)
    assert again.fingerprint() == corpus.fingerprint()
    assert again.client_names == corpus.client_names
    other = stdlib_corpus(max_bytes_per_client=60_000, max_pretrain_bytes=60_000, max_test_bytes=40_000, seed=1)
    assert other.fingerprint() != corpus.fingerprint()  # the seed picks the test files and orders


def test_corpus_shapes_and_exclusions(corpus):
    assert corpus.num_clients >= 20
    assert all(t.dtype == torch.uint8 and 0 < t.numel() <= 60_000 for t in corpus.client_tokens)
    assert corpus.pretrain_tokens.numel() == 60_000 and 0 < corpus.test_tokens.numel() <= 40_000
    every = [f for files in corpus.client_files for f in files] + list(corpus.test_files)
    assert not any(f.split("/")[0] in ("test", "idlelib", "lib2to3", "site-packages") for f in every)
    assert not any("/test/" in f or "/tests/" in f for f in every)
    with pytest.raises(CorpusError, match="out of range"):
        corpus.client(corpus.num_clients)


def test_test_and_pretrain_splits_are_disjoint_from_clients(corpus):
    client_files = {f for files in corpus.client_files for f in files}
    assert client_files.isdisjoint(corpus.test_files)
    assert client_files.isdisjoint(corpus.pretrain_files)
    assert set(corpus.test_files).isdisjoint(corpus.pretrain_files)
    assert {f.split("/")[0] for f in corpus.pretrain_files} <= {"unittest", "distutils", "tkinter"}
    # the test set draws from many client groups, not one
    assert len({f.split("/")[0] for f in corpus.test_files}) >= 10


def _top_identifiers(tokens: torch.Tensor, n: int = 30) -> set[bytes]:
    words = collections.Counter(re.findall(rb"[A-Za-z_]\w{3,}", tokens.numpy().tobytes()))
    return {w for w, _ in words.most_common(n)}


def test_clients_are_non_iid(corpus):
    """Clients' 30 most frequent identifiers overlap little (mean Jaccard ≈ 0.2 on 3.11)."""
    tops = [_top_identifiers(t) for t in corpus.client_tokens]
    jaccard = [len(a & b) / len(a | b) for a, b in itertools.combinations(tops, 2)]
    assert sum(jaccard) / len(jaccard) < 0.35
    assert max(jaccard) < 0.75


def test_num_clients_merges_deterministically_and_errors_when_too_many(corpus):
    five = stdlib_corpus(max_bytes_per_client=5_000, max_pretrain_bytes=1_000, max_test_bytes=1_000, num_clients=5)
    assert five.num_clients == 5
    assert five.client_names == stdlib_corpus(max_bytes_per_client=5_000, max_pretrain_bytes=1_000,
                                              max_test_bytes=1_000, num_clients=5).client_names
    with pytest.raises(CorpusError, match="lower num_clients"):
        stdlib_corpus(num_clients=corpus.num_clients + 1)


def test_corpus_from_a_custom_tree(tmp_path):
    """Grouping on a hand-made tree: packages are groups, tests are skipped, small groups merge."""
    def write(rel: str, n: int) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n" * n)

    for pkg, lines in (("alpha", 2000), ("beta", 2000), ("gamma", 500), ("unittest", 100)):
        write(f"{pkg}/__init__.py", lines)
        write(f"{pkg}/core.py", lines)
    write("alpha/tests/test_a.py", 5000)  # skipped: a test suite
    write("test/regrtest.py", 5000)  # skipped: excluded top-level group
    write("delta/__init__.py", 10)  # tiny: merged into its smaller neighbour, gamma
    write("aaa.py", 3000)
    write("zzz.py", 3000)  # both modules fit one 100 kB bucket
    c = stdlib_corpus(root=tmp_path, bucket_bytes=100_000, min_group_bytes=1_000, test_fraction=0.5,
                      max_bytes_per_client=None, max_test_bytes=None, max_pretrain_bytes=None)
    assert c.client_names == ("alpha", "beta", "delta+gamma", "modules:aaa..zzz")
    assert c.pretrain_files == ("unittest/__init__.py", "unittest/core.py")
    assert not any("tests" in f or f.startswith("test/") for files in c.client_files for f in files)
    assert len(c.test_files) == 4  # one of the two equal files of each group
    with pytest.raises(CorpusError, match="pretraining groups"):
        stdlib_corpus(root=tmp_path, pretrain_groups=("nope",))


# -- model -------------------------------------------------------------------------------------


def test_gpt_default_size_and_state_dict():
    model = GPT()
    n = model.num_parameters()
    print(f"GPT default parameters: {n:,}")
    assert n >= 1_000_000
    assert sum(v.numel() for v in model.state_dict().values()) == n  # tied head stored once
    assert model(torch.zeros(2, 128, dtype=torch.long)).shape == (2, 128, 256)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_gpt_is_causal():
    model = GPT(TINY, seed=3).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_gpt_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = GPT(TINY, seed=1), GPT(TINY, seed=1), GPT(TINY, seed=2)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_gpt_config_validates():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


# -- batches, evaluation, training ---------------------------------------------------------------


def test_lm_batches_are_shifted_windows():
    tokens = torch.arange(200, dtype=torch.uint8)
    batches = list(lm_batches(tokens, 16, 4, torch.Generator().manual_seed(0), num_batches=3))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    again = next(lm_batches(tokens, 16, 4, torch.Generator().manual_seed(0)))
    assert torch.equal(again[0], x)
    with pytest.raises(ValueError, match="context"):
        next(lm_batches(tokens[:16], 16, 4, torch.Generator()))


def test_evaluate_is_deterministic_and_restores_mode(corpus):
    model = GPT(TINY).train()
    first = evaluate_lm(model, corpus.test_tokens, batch_size=8, max_batches=2)
    assert evaluate_lm(model, corpus.test_tokens, batch_size=8, max_batches=2) == first
    assert model.training
    loss, ppl = first
    assert ppl == pytest.approx(torch.tensor(loss).exp().item())
    assert abs(loss - torch.log(torch.tensor(256.0)).item()) < 0.5  # near-uniform at init


def test_a_few_steps_lower_the_loss(corpus):
    model = GPT(TINY, seed=0)
    before, _ = evaluate_lm(model, corpus.test_tokens, batch_size=16, max_batches=4)
    losses = train_lm(model, corpus.client(0), steps=40, lr=3e-3, batch_size=16, seed=0)
    after, _ = evaluate_lm(model, corpus.test_tokens, batch_size=16, max_batches=4)
    assert after < before - 1.0
    assert sum(losses[-5:]) < sum(losses[:5])


# -- pretraining cache -----------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_cache_hit_and_corrupt_file(corpus, tmp_path):
    first = pretrain(TINY, corpus, steps=8, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    assert not first.from_cache and first.cache_path.exists() and len(first.losses) == 8
    hit = pretrain(TINY, corpus, steps=8, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    assert hit.from_cache and hit.cache_path == first.cache_path and _same_weights(hit.model, first.model)
    assert hit.losses == first.losses

    other = pretrain(TINY, corpus, steps=9, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    assert other.cache_path != first.cache_path  # different settings, different file

    first.cache_path.write_bytes(b"definitely not a torch file")
    with pytest.warns(RuntimeWarning, match="unusable"):
        rebuilt = pretrain(TINY, corpus, steps=8, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    assert not rebuilt.from_cache and _same_weights(rebuilt.model, first.model)  # deterministic rebuild
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pretrain(TINY, corpus, steps=8, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8).from_cache
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_pretrain_cache_with_mismatched_key_is_rebuilt(corpus, tmp_path):
    first = pretrain(TINY, corpus, steps=4, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    blob = torch.load(first.cache_path, weights_only=True)
    blob["key"] = json.dumps({"something": "else"})
    torch.save(blob, first.cache_path)
    with pytest.warns(RuntimeWarning, match="different settings"):
        again = pretrain(TINY, corpus, steps=4, lr=3e-3, seed=0, cache_dir=tmp_path, batch_size=8)
    assert not again.from_cache and _same_weights(again.model, first.model)


# -- Hugging Face path ---------------------------------------------------------------------------


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["print('hi')", "x = 1"], "id": [0, 1]}).save_to_disk(tmp_path / "ds")
    ds = load_hf_text_dataset(str(tmp_path / "ds"))
    assert ds["text"] == ["print('hi')", "x = 1"]
    tokens = texts_to_tokens(ds["text"])
    assert tokens.dtype == torch.uint8 and ByteTokenizer().decode(tokens) == "print('hi')\n\nx = 1\n\n"
    assert texts_to_tokens(ds["text"], max_bytes=5).numel() == 5
    with pytest.raises(KeyError, match="no column"):
        load_hf_text_dataset(str(tmp_path / "ds"), text_field="body")


def test_hf_dataset_from_local_json(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    ds = load_hf_text_dataset("json", "train", tmp_path / "cache", data_files=str(data))
    assert ds["text"] == [f"line {i}" for i in range(4)]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_causal_lm_without_transformers_says_how_to_fix():
    with pytest.raises(ImportError, match="pip install transformers"):
        hf_causal_lm("sshleifer/tiny-gpt2")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (optional; needed only for hf_causal_lm)")
def test_hf_causal_lm_loads_a_local_checkpoint(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=256, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "ckpt")
    model = hf_causal_lm(str(tmp_path / "ckpt"))
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 256)
