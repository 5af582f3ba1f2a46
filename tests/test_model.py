"""Tests for model.py: each piece against a hand computation or a naive reference. Tiny models, fast."""
import json
import math
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

import data.plumbing as P
import data.prepare as D
import model as M
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# ------------------------------------------------------------------------------------------ [实战框架 §4.1.2]

def test_sinusoidal_positions_hand_values():
    d = 8
    pe = M.sinusoidal_positions(16, d)
    assert pe.shape == (16, d)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * (d // 2)))            # sin(0)=0, cos(0)=1
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)          # i=0: angle = pos
    assert pe[1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    # pos 5, i = 2 (dims 4 and 5): angle = 5 / 10000^(4/8) = 5 / 100 = 0.05
    assert pe[5, 4].item() == pytest.approx(math.sin(0.05), abs=1e-6)
    assert pe[5, 5].item() == pytest.approx(math.cos(0.05), abs=1e-6)
    # pos 11, i = 1 (dims 2 and 3): angle = 11 / 10000^(2/8) = 11 / 10 = 1.1
    assert pe[11, 2].item() == pytest.approx(math.sin(1.1), abs=1e-6)
    assert pe[11, 3].item() == pytest.approx(math.cos(1.1), abs=1e-6)


def test_model_adds_positional_encoding_to_scaled_embedding():
    m = tiny(n_layer=0)                                                       # no blocks: h = ln_f(x)
    idx = torch.tensor([[3, 3, 7]])
    x = m.wte(idx) * math.sqrt(32) + M.sinusoidal_positions(32, 32)[:3]
    assert torch.allclose(m.hidden_states(idx), F.layer_norm(x, (32,)), atol=1e-5)


# ------------------------------------------------------------------------------------------ [实战框架 §4.1.3]

def test_layernorm_equals_torch():
    torch.manual_seed(0)
    ln = M.LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 2
    ref = F.layer_norm(x, (16,), ln.weight, ln.bias, eps=1e-5)
    assert torch.allclose(ln(x), ref, atol=1e-5)
    ln_nobias = M.LayerNorm(16, bias=False)
    assert ln_nobias.bias is None
    assert torch.allclose(ln_nobias(x), F.layer_norm(x, (16,), eps=1e-5), atol=1e-5)


# ------------------------------------------------------------------------------------------ [实战框架 §4.1.1]

def test_math_attention_equals_sdpa():
    m = tiny()
    idx = torch.randint(0, 97, (3, 12))
    pad = torch.tensor([0, 4, 11])
    m.set_sdpa(True)
    fused, fused_pad = m(idx), m(idx, pad=pad)
    m.set_sdpa(False)
    assert all(not b.attn.use_sdpa for b in m.blocks)
    math_, math_pad = m(idx), m(idx, pad=pad)
    assert torch.allclose(fused, math_, atol=1e-5)
    assert torch.allclose(fused_pad, math_pad, atol=1e-5)
    assert not torch.isnan(math_pad).any()                                    # pad queries still have a key


def test_attention_mask_by_hand():
    mask = M.attention_mask(2, 1, torch.tensor([2]), "cpu")                   # queries at 1, 2; keys 0..2; 2 pads
    assert mask.shape == (1, 1, 2, 3)
    # query 1 is a pad position: only itself. query 2 is real: only key 2 (keys 0, 1 are padding).
    assert mask[0, 0].tolist() == [[False, True, False], [False, False, True]]


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny()
    a = torch.randint(0, 97, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 97
    assert torch.allclose(m(a)[:, :6], m(b)[:, :6], atol=1e-5)
    assert not torch.allclose(m(a)[:, 6:], m(b)[:, 6:], atol=1e-3)


@pytest.mark.parametrize("sdpa", [True, False])
def test_kv_cache_token_by_token_equals_full_forward(sdpa):
    m = tiny()
    m.set_sdpa(sdpa)
    idx = torch.randint(0, 97, (2, 16))
    full = m(idx)                                                             # (2, 16, V)
    cache = m.new_cache(2, 16)
    steps = [m(idx[:, t:t + 1], cache=cache) for t in range(16)]              # 16 x (2, 1, V)
    assert cache.pos == 16
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    cache = m.new_cache(2, 16)                                                # prefill 5, then one by one
    parts = [m(idx[:, :5], cache=cache)] + [m(idx[:, t:t + 1], cache=cache) for t in range(5, 16)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="full"):
        m(idx[:, :1], cache=cache)


def test_left_padding_gives_same_logits_as_unpadded_row():
    m = tiny()
    short, long = torch.randint(0, 97, (5,)), torch.randint(0, 97, (9,))
    batch = torch.stack([torch.cat([torch.full((4,), D.EOT % 97), short]), long])  # (2, 9), row 0 has 4 pads
    pad = torch.tensor([4, 0])
    out = m(batch, pad=pad)
    assert torch.allclose(out[0, 4:], m(short[None])[0], atol=1e-5)
    assert torch.allclose(out[1], m(long[None])[0], atol=1e-5)
    # the same with a KV cache: prefill the padded batch, then decode two more tokens
    nxt = torch.randint(0, 97, (2, 2))
    cache = m.new_cache(2, 11)
    m(batch, pad=pad, cache=cache)
    step1, step2 = m(nxt[:, :1], pad=pad, cache=cache), m(nxt[:, 1:], pad=pad, cache=cache)
    alone = m(torch.cat([short, nxt[0]])[None])                               # (1, 7, V)
    assert torch.allclose(step1[0, 0], alone[0, 5], atol=1e-5)
    assert torch.allclose(step2[0, 0], alone[0, 6], atol=1e-5)


def test_sequence_longer_than_block_size_is_an_error():
    m = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- loss

def test_masked_loss_equals_manual_cross_entropy():
    m = tiny()
    idx, targets = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    logp = F.log_softmax(m(idx), dim=-1)                                      # (2, 7, V)
    nll = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(7) if mask[b, t]]
    manual = sum(nll) / len(nll)
    assert m(idx, targets, mask).item() == pytest.approx(manual.item(), rel=1e-5)
    # an integer 0/1 mask (e.g. straight from the uint8 mask files) means the same as a bool mask
    assert m(idx, targets, mask.long()).item() == pytest.approx(manual.item(), rel=1e-5)
    everything = F.cross_entropy(m(idx).view(-1, 97), targets.view(-1))
    assert m(idx, targets).item() == pytest.approx(everything.item(), rel=1e-5)


def test_weight_tying():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight
    n_untied = sum(p.numel() for n, p in m.named_parameters(remove_duplicate=False))
    assert m.num_params() == n_untied - 97 * 32                               # counted once
    m.train()
    m(torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 5))).backward()
    assert m.wte.weight.grad is not None and m.lm_head.weight.grad is m.wte.weight.grad


def test_param_groups():
    m = tiny()
    decay, no_decay = M.param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert not any(p is m.wte.weight for p in decay["params"])
    assert any(p is m.wte.weight for p in no_decay["params"])
    assert all(p.dim() == 1 or p is m.wte.weight for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))             # each parameter exactly once
    assert any(p is m.blocks[0].attn.qkv.weight for p in decay["params"])


def test_hidden_states_shape():
    m = tiny()
    h = m.hidden_states(torch.randint(0, 97, (3, 11)))
    assert h.shape == (3, 11, 32)
    assert torch.allclose(h.mean(-1), torch.zeros(3, 11), atol=1e-4)          # after the final LayerNorm


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_gpt2_bpe_cut_to_vocab_size():
    enc, full = D.get_tokenizer(), D.get_tokenizer(50257)
    assert full.encode("Hello world") == [15496, 995]                         # GPT-2's own ids
    assert full.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == D.VOCAB_SIZE == 8192 == GPTConfig().vocab_size
    assert enc.encode("<|endoftext|>", allowed_special="all") == [D.EOT] == [8191]  # the last id
    assert enc.eot_token == D.EOT
    # common words keep GPT-2's ids (their ranks are below the cut); rarer ones are spelled in smaller pieces
    assert enc.encode("Hello world") == [39, 695, 78, 995]                   # "Hello" (15496) is spelled H-ell-o
    assert enc.encode(" the king") == full.encode(" the king") == [262, 5822]
    rare = " Helsinki"                                                        # one GPT-2 token, ranked > 8191
    assert len(full.encode_ordinary(rare)) == 1 and full.encode_ordinary(rare)[0] >= 8191
    assert len(enc.encode_ordinary(rare)) > 1 and max(enc.encode_ordinary(rare)) < 8191
    assert enc.decode(enc.encode_ordinary(rare)) == rare
    with pytest.raises(ValueError, match="vocab_size"):
        D.get_tokenizer(100)


def test_tokenizer_round_trips_any_text():
    """A cut BPE is still a complete byte-level BPE: every string comes back exactly."""
    enc = D.get_tokenizer()
    rng = random.Random(0)
    texts = ["Thou art kind, my love, not a villain!", "日本語のテキスト 🎭 émigré naïve Ωμέγα", "\x00\x07\t\r\n  \n\n",
             "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(2000)),      # arbitrary Unicode
             "".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x10FFFF)])) for _ in range(500))]
    with open(os.path.join(ROOT, "tests", "fixtures", "hh_rlhf_small.jsonl"), encoding="utf-8") as f:
        texts += [json.loads(line)["chosen"] for line in f if line.strip()]  # HH-RLHF transcripts
    from data.prepare import load_turns
    texts += [t["prompt"] + "\n" + t["reply"] for t in load_turns("test")]  # the held-out plays, every turn
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert max(ids) < D.EOT and enc.decode(ids) == text


def test_tokenizer_hash_mismatch(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(D.TOKENIZER_FILE, bad)
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        D.get_tokenizer(path=str(bad))
    with pytest.raises(FileNotFoundError):
        D.get_tokenizer(path=str(tmp_path / "nothing.tiktoken"))


def test_chat_format():
    assert D.format_prompt("Hi") == "\n\nHuman: Hi\n\nAssistant:"
    assert D.format_prompt(["a", "b", "c "]) == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    enc = D.get_tokenizer()
    assert D.encode_reply(enc, "Hello world") == [5783, 78, 995, D.EOT]      # " Hell" "o" " world"


# ---------------------------------------------------------------------------------------------------- checkpoints

def ckpt_of(m):
    from dataclasses import asdict
    return {"model_args": asdict(m.config), "model": m.state_dict(), "kind": "sft"}


def test_save_checkpoint_atomic_and_roundtrip(tmp_path, monkeypatch):
    m = tiny()
    path = tmp_path / "sub" / "sft.pt"
    P.save_checkpoint(ckpt_of(m), str(path))
    assert os.listdir(path.parent) == ["sft.pt"]                              # no temp file left behind
    m2 = M.gpt_from_checkpoint(P.load_checkpoint(str(path), made_by="train_sft.py")).eval()
    idx = torch.randint(0, 97, (1, 6))
    assert torch.equal(m(idx), m2(idx))

    other = tiny(seed=1)
    P.save_checkpoint(ckpt_of(other), str(path))                              # overwrite works
    assert os.listdir(path.parent) == ["sft.pt"]
    m3 = M.gpt_from_checkpoint(P.load_checkpoint(str(path), made_by="train_sft.py")).eval()
    assert torch.equal(other(idx), m3(idx))

    def crash(obj, f):                                                        # die half way through writing
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(P.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        P.save_checkpoint(ckpt_of(m), str(path))
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["sft.pt"]
    m4 = M.gpt_from_checkpoint(P.load_checkpoint(str(path), made_by="train_sft.py")).eval()
    assert torch.equal(other(idx), m4(idx))                                   # the old file is intact


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_rm.py"):
        P.load_checkpoint(str(tmp_path / "rm.pt"), made_by="train_rm.py")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="train_sft.py"):
        P.load_checkpoint(str(junk), made_by="train_sft.py")
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(ValueError, match="not a checkpoint"):
        P.load_checkpoint(str(lst), made_by="train_sft.py")
    no_model = tmp_path / "no_model.pt"
    torch.save({"model_args": {}}, no_model)
    with pytest.raises(ValueError, match="not a checkpoint"):
        P.load_checkpoint(str(no_model), made_by="train_sft.py")


def test_checkpoint_records_its_tokenizer_and_another_vocabulary_is_refused(tmp_path):
    m = tiny()
    P.save_checkpoint(ckpt_of(m), str(tmp_path / "sft.pt"))
    assert P.load_checkpoint(str(tmp_path / "sft.pt"), made_by="train_sft.py")["tokenizer"] == D.TOKENIZER_NAME
    # a checkpoint of the full GPT-2 vocabulary, as this project wrote them before (no "tokenizer" key)
    old = {"model_args": {**ckpt_of(m)["model_args"], "vocab_size": 50257}, "model": {}, "kind": "sft"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"another vocabulary \(gpt2-bpe-50257\).*gpt2-bpe-8192.*train_sft.py"):
        P.load_checkpoint(str(tmp_path / "old.pt"), made_by="train_sft.py")
    torch.save({**ckpt_of(m), "tokenizer": "gpt2-bpe-4096"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another vocabulary"):
        P.load_checkpoint(str(tmp_path / "other.pt"), made_by="train_sft.py")


def test_gpt_from_checkpoint_mismatch_and_prefix(tmp_path):
    small, wide = tiny(), tiny(n_embd=64)
    bad = {"model_args": ckpt_of(small)["model_args"], "model": wide.state_dict()}
    with pytest.raises(ValueError, match="do not match"):
        M.gpt_from_checkpoint(bad)
    with pytest.raises(ValueError, match="unknown fields"):
        M.gpt_from_checkpoint({"model_args": {**ckpt_of(small)["model_args"], "n_heads": 2}, "model": {}})
    # weights saved from a wrapper ('body.') and from torch.compile ('_orig_mod.') load with prefix=
    wrapped = {"model_args": ckpt_of(small)["model_args"],
               "model": {"body._orig_mod." + k: v for k, v in small.state_dict().items()}}
    rebuilt = M.gpt_from_checkpoint(wrapped, prefix="body.").eval()
    idx = torch.randint(0, 97, (1, 4))
    assert torch.equal(rebuilt(idx), small(idx))
