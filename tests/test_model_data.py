"""model.py and data.py: shapes, the causal mask, the byte tokenizer, the cache, masking, the split
of the standard library's files."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import data
from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


def test_shapes_and_tied_head():
    model = tiny()
    idx, targets = torch.randint(0, 256, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 256) and loss.shape == ()
    assert model.lm_head.weight is model.wte.weight
    # at init the model is close to uniform over 256 bytes
    assert abs(loss.item() - np.log(256)) < 0.1
    assert model.generate(idx[:, :4], 5).shape == (3, 9)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_target_names_are_separate_linears():
    names = {n.rpartition(".")[2] for n, m in tiny().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "lm_head"}


def test_a_future_token_never_changes_a_past_logit():
    model = tiny().eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_the_encoder_sees_the_future():
    model = tiny(bidirectional=True, vocab_size=257, n_classes=8).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    assert not torch.allclose(a[:, 8], b[:, 8])
    logits, loss = model.classify(idx, torch.tensor([3]))
    assert logits.shape == (1, 8) and loss.item() > 0


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return x ** 2  # héllo, 世界\n"
    ids = data.encode(text)
    assert ids[:4] == [100, 101, 102, 32] and len(ids) == len(text.encode("utf-8"))
    assert data.encode("é") == [195, 169]
    assert data.decode(ids) == text
    assert data.decode([0xff, 65]) == "\ufffdA"  # invalid UTF-8 is replaced, never an error


def test_splits_are_deterministic_and_ordered():
    assert data.split_bounds(1000) == {"train": (0, 900), "val": (900, 950), "test": (950, 1000)}


def test_cache_is_reused_then_rebuilt_when_the_text_changes(tmp_path):
    text = bytes(range(256)) * 10
    splits = data.build_cache("c", text, "test", str(tmp_path))
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(text).hexdigest() and meta["tokens"] == 2560
    assert bytes(splits["train"][:3]) == b"\x00\x01\x02" and len(splits["val"]) == 128
    stamp = os.stat(tmp_path / "c" / "train.bin").st_mtime_ns
    data.build_cache("c", text, "test", str(tmp_path))
    assert os.stat(tmp_path / "c" / "train.bin").st_mtime_ns == stamp  # same text: not rewritten
    changed = b"x" + text[1:]
    splits = data.build_cache("c", changed, "test", str(tmp_path))
    assert bytes(splits["train"][:1]) == b"x"


def test_get_batch_targets_are_shifted_inputs():
    arr = np.arange(200, dtype=np.uint8)
    x, y = data.get_batch(arr, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y, x + 1)


def test_masking_rate_and_ignored_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 128), generator=g)
    xm, targets = data.mask_tokens(x, mask_id=256, generator=g)
    picked = targets != -1
    assert abs(picked.float().mean().item() - 0.15) < 0.01
    assert torch.equal(targets[picked], x[picked])        # the original bytes are the targets
    assert torch.equal(xm[~picked], x[~picked])           # unpicked positions are untouched
    masked = (xm == 256)
    assert not masked[~picked].any()
    assert abs(masked[picked].float().mean().item() - 0.8) < 0.03


def test_the_split_by_file_is_deterministic_and_its_holdout_is_out_of_the_base():
    split_of = data.stdlib_split_of()
    assert split_of == data.stdlib_split_of() and set(split_of) == set(data.stdlib_sources())
    assert set(split_of.values()) == {"train", "val", "test"}
    holdout = set(data.glue_holdout_files())
    assert holdout == {p for p, s in split_of.items() if s != "train"}
    assert not holdout & set(data.stdlib_sources(exclude=holdout))
