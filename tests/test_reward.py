"""Tests for reward.py: losses against hand-worked numbers and naive loops, the reward model's plumbing,
and the simulated rater panel against the lexicon file."""
import itertools
import json
import math
import os
import random
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from data.prepare import EOT, encode_reply, format_prompt, get_tokenizer
from data.plumbing import load_checkpoint, save_checkpoint
from data.prepare import words
from data.panel import LEXICON_FILE, Panel, gold_accuracy, load_lexicon, vader_tokens
from reward import (RewardModel, batch_replies, book_relu_loss, bradley_terry_loss, plackett_luce_loss,
                    rating_loss)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


# ---------------------------------------------------------------------------------------------- losses

def test_bradley_terry_hand_values():
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)        # 0.126928
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.1269280110 + math.log(2)) / 2, abs=1e-6)
    far = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))           # no overflow
    assert far.item() == pytest.approx(100.0, abs=1e-4)


def naive_plackett_luce(scores, mask):
    total = 0.0
    for row, m in zip(scores.tolist(), mask.tolist()):
        s = [x for x, present in zip(row, m) if present]
        logp = sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(len(s)))
        total -= logp
    return total / len(scores)


def test_plackett_luce_hand_example():
    s = torch.tensor([[2.0, 1.0, 0.0]])                                              # best first
    expected = -((2 - math.log(math.e ** 2 + math.e + 1)) + (1 - math.log(math.e + 1)))
    assert expected == pytest.approx(0.7208677, abs=1e-6)
    assert plackett_luce_loss(s).item() == pytest.approx(expected, abs=1e-6)


def test_plackett_luce_matches_naive_loop_with_ragged_mask():
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(6, 5, generator=g) * 2).requires_grad_()
    lengths = [5, 2, 3, 4, 5, 2]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]                 # absent at the end
    mask[5] = torch.tensor([True, False, True, True, False])                         # or anywhere
    loss = plackett_luce_loss(scores, mask)
    assert loss.item() == pytest.approx(naive_plackett_luce(scores.detach(), mask), abs=1e-5)
    full = plackett_luce_loss(scores.detach())
    all_present = torch.ones(6, 5, dtype=torch.bool)
    assert full.item() == pytest.approx(naive_plackett_luce(scores.detach(), all_present), abs=1e-5)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[~mask] == 0).all()                                           # absent: no gradient
    assert (scores.grad[mask] != 0).any()


def test_plackett_luce_equals_bradley_terry_for_two():
    g = torch.Generator().manual_seed(1)
    r_c, r_r = torch.randn(16, generator=g), torch.randn(16, generator=g)
    pl = plackett_luce_loss(torch.stack([r_c, r_r], dim=1))
    assert pl.item() == pytest.approx(bradley_terry_loss(r_c, r_r).item(), abs=1e-6)


def test_book_relu_loss_never_learns_from_a_misranked_pair():
    def grads(loss_fn, c, r):
        r_c, r_r = torch.tensor(c, requires_grad=True), torch.tensor(r, requires_grad=True)
        loss = loss_fn(r_c, r_r)
        loss.backward()
        return loss.item(), r_c.grad.item(), r_r.grad.item()

    loss, g_c, g_r = grads(book_relu_loss, -1.0, 1.0)                                # mis-ranked pair
    assert loss == pytest.approx(math.log(2)) and g_c == 0.0 and g_r == 0.0
    loss, g_c, g_r = grads(bradley_terry_loss, -1.0, 1.0)
    assert g_c == pytest.approx(-1 / (1 + math.exp(-2)), abs=1e-6) and g_r == pytest.approx(-g_c)
    assert g_c < 0                                                                   # descent raises r_c
    # one SGD step, lr = 2: ours fixes the order, the book's does not move
    for loss_fn, fixed in ((bradley_terry_loss, True), (book_relu_loss, False)):
        r = torch.tensor([-1.0, 1.0], requires_grad=True)
        loss_fn(r[:1], r[1:]).backward()
        with torch.no_grad():
            r -= 2.0 * r.grad                                                        # SGD step
        assert (r[0] > r[1]).item() is fixed
        if not fixed:
            assert r.tolist() == [-1.0, 1.0]
    # a correctly ranked pair: the book's loss is Bradley-Terry there, so it still pushes the right way
    _, g_c_book, _ = grads(book_relu_loss, 1.0, 0.0)
    _, g_c_bt, _ = grads(bradley_terry_loss, 1.0, 0.0)
    assert g_c_book == pytest.approx(g_c_bt) and g_c_book < 0


def test_rating_loss_hand_values():
    r = torch.tensor([0.5, -1.0])
    assert rating_loss(r, torch.tensor([5.0, 2.0])).item() == pytest.approx(0.25)   # targets 1, -0.5
    assert rating_loss(torch.tensor([0.0]), torch.tensor([5.0]), lo=0, hi=10).item() == pytest.approx(0.0)
    lo, hi = torch.tensor([1.0, 0.0]), torch.tensor([5.0, 10.0])                     # mixed scales
    loss = rating_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 10.0]), lo, hi)  # targets -1, 1
    assert loss.item() == pytest.approx(1.0)


def test_gold_accuracy_skips_equal_gold():
    acc, n = gold_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 3.0, 5.0]),
                           [1, 1, 0, 2], [0, 0, 1, 2])
    assert n == 3 and acc == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no pairs"):
        gold_accuracy([1.0], [0.0], [1.0], [1.0])


# -------------------------------------------------------------------------------------- reward model

def test_head_init_and_defaults():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=256))
    std = rm.head.weight.std().item()
    assert std == pytest.approx(1 / math.sqrt(257), rel=0.15)
    assert rm.head.bias.item() == 0.0
    assert rm.reward_mean == 0.0 and rm.reward_std == 1.0
    assert not any("reward_" in k for k in rm.state_dict())                          # floats, not state


def test_score_is_the_mean_over_the_reply_and_values():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=100, **TINY)).eval()
    idx = torch.randint(0, 100, (2, 10))
    reply = torch.zeros(2, 10, dtype=torch.bool)
    reply[0, 1:4], reply[1, 6:] = True, True                                         # row 0: tokens 1..3
    with torch.no_grad():
        r = rm(idx, reply)
        v = rm.values(idx)
        assert r.shape == (2,) and v.shape == (2, 10)
        assert torch.allclose(r, torch.stack([v[0, 1:4].mean(), v[1, 6:].mean()]), atol=1e-6)   # by hand
        later = idx.clone()
        later[0, 4:] = (later[0, 4:] + 1) % 100                                       # after the reply
        assert torch.allclose(rm(later, reply)[0], r[0], atol=1e-6)                   # causal: no effect
        inside = idx.clone()
        inside[0, 2] = (inside[0, 2] + 1) % 100                                       # a reply token
        assert not torch.isclose(rm(inside, reply)[0], r[0])
        rm.reward_mean, rm.reward_std = 0.5, 2.0
        assert torch.allclose(rm.score(idx, reply), (r - 0.5) / 2.0)


def test_values_and_scores_stay_float32_under_bf16_autocast():
    # bf16 keeps 8 significant bits: scores 1.150 and 1.156 would be one number. The body may run in bf16,
    # the head (a d-vector dot product) runs in float32 on whatever the body gives it.
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=100, **TINY)).eval()
    with torch.no_grad():
        rm.head.bias.fill_(1.15)
        idx, reply = torch.randint(0, 100, (4, 10)), torch.arange(10)[None, :] >= torch.tensor([[7], [4], [9], [0]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r, v = rm(idx, reply), rm.values(idx)
            h = rm.body.hidden_states(idx)                                            # (4, 10, d)
        assert r.dtype == v.dtype == torch.float32
        expected = h.float() @ rm.head.weight[0] + rm.head.bias[0]                    # (4, 10) float32
        assert torch.allclose(v, expected, atol=1e-6)
        assert torch.allclose(r, (expected * reply).sum(1) / reply.sum(1), atol=1e-6)
        assert not torch.equal(r, r.bfloat16().float())                               # finer than bf16


def test_batch_replies_layout_and_truncation():
    enc = SimpleNamespace(eot_token=99)
    idx, pad, reply = batch_replies(enc, [[1, 2, 3], [4]], [[5, 99], [6, 7, 99]], block_size=8)
    assert idx.tolist() == [[1, 2, 3, 5, 99], [99, 4, 6, 7, 99]]
    assert pad.tolist() == [0, 1] and reply.int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    idx, pad, reply = batch_replies(enc, [[1, 2, 3], [4]], [[5, 99], [6, 7, 99]], block_size=4)
    assert idx.tolist() == [[2, 3, 5, 99], [4, 6, 7, 99]]                             # prompt cut on the left
    idx, _, reply = batch_replies(enc, [[1, 2]], [[5, 6, 99]], block_size=3)         # no room for the prompt
    assert idx.tolist() == [[5, 6, 99]] and reply.all()
    idx, _, _ = batch_replies(enc, [[1, 2]], [[5, 6, 7, 99]], block_size=3)          # reply alone too long
    assert idx.tolist() == [[6, 7, 99]]
    with pytest.raises(ValueError, match="EOT"):
        batch_replies(enc, [[1]], [[5, 6]], block_size=8)


def test_padded_batch_scores_like_each_row_alone():
    torch.manual_seed(0)
    enc = get_tokenizer()
    rm = RewardModel(GPTConfig(**TINY)).eval()
    prompts = [enc.encode_ordinary(format_prompt(p)) for p in ("Hello there, friend.", "Speak.")]
    replies = [encode_reply(enc, r) for r in ("Good day.", "I have nothing kind to say to thee today.")]
    idx, pad, reply = batch_replies(enc, prompts, replies, block_size=64)
    assert pad.min().item() == 0 and pad.max().item() > 0
    assert (idx[:, -1] == EOT).all()
    with torch.no_grad():
        together = rm(idx, reply, pad)
        for i in range(2):
            one_idx, one_pad, one_reply = batch_replies(enc, prompts[i:i + 1], replies[i:i + 1], block_size=64)
            assert torch.allclose(rm(one_idx, one_reply, one_pad), together[i:i + 1], atol=1e-5)


def test_sum_readout_adds_the_head_over_the_reply(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=100, **TINY)
    rm = RewardModel(cfg, readout="sum").eval()
    idx = torch.randint(0, 100, (2, 10))
    reply = torch.zeros(2, 10, dtype=torch.bool)
    reply[0, 1:4], reply[1, 6:] = True, True
    with torch.no_grad():
        v = rm.values(idx)
        assert torch.allclose(rm(idx, reply), torch.stack([v[0, 1:4].sum(), v[1, 6:].sum()]), atol=1e-6)
    ckpt = rm.checkpoint_dict()
    assert ckpt["readout"] == "sum" and RewardModel.from_checkpoint(ckpt).readout == "sum"
    del ckpt["readout"]                                                   # an rm.pt from before the flag
    assert RewardModel.from_checkpoint(ckpt).readout == "mean"
    with pytest.raises(ValueError, match="readout"):
        RewardModel(cfg, readout="last")


def test_from_sft_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=100, **TINY)
    gpt = GPT(cfg)
    sft = {"model_args": cfg.__dict__.copy(), "model": gpt.state_dict(), "kind": "sft"}
    rm = RewardModel.from_sft(sft).eval()
    for k, v in gpt.state_dict().items():
        assert torch.equal(rm.body.state_dict()[k], v)
    rm.reward_mean, rm.reward_std = 0.25, 3.0
    path = str(tmp_path / "rm.pt")
    save_checkpoint(rm.checkpoint_dict(), path)
    ckpt = load_checkpoint(path, made_by="train_rm.py")                               # weights_only=True
    assert ckpt["kind"] == "rm" and isinstance(ckpt["reward_mean"], float)
    rm2 = RewardModel.from_checkpoint(ckpt).eval()
    idx, reply = torch.randint(0, 100, (3, 12)), torch.arange(12)[None, :] >= torch.tensor([[11], [5], [8]])
    with torch.no_grad():
        assert torch.equal(rm2(idx, reply), rm(idx, reply))
        assert torch.equal(rm2.score(idx, reply), rm.score(idx, reply))
    assert (rm2.reward_mean, rm2.reward_std) == (0.25, 3.0)
    with pytest.raises(ValueError, match="not a reward-model checkpoint"):
        RewardModel.from_checkpoint(sft)


# --------------------------------------------------------------------------------------------- panel

@pytest.fixture(scope="module")
def panel():
    """VADER's rules alone: departure 5 (words of none of the plays) off, so the hand-worked sums are VADER's."""
    return Panel(known_words=None)


def test_a_word_of_none_of_the_plays_puts_every_rater_off():
    from data.panel import UNREADABLE
    reader, blind = Panel(), Panel(known_words=None)
    assert "gracily" not in reader.known_words and "good" in reader.known_words
    for text in ("So what but your gracily than good good.", "Thou art a gracily, trasteing man."):
        n = sum(w in ("gracily", "trasteing") for w in set(text.lower().replace(",", "").rstrip(".").split()))
        sums = blind.sentiment_sum(text) + UNREADABLE * n                  # (R,) the same sums, minus 0.5 each
        assert reader.rater_scores(text) == pytest.approx(vader(sums))
    assert reader.gold("Thou art kind, gracily lord.") < reader.gold("Thou art kind, gentle lord.")
    assert reader.reference_compound("gracily") == 0.0                   # VADER itself reads every word
    unkind = Panel(preference="unkind")                                  # cruelty in made-up words: no better
    assert unkind.gold("Thou art a gracily trasteing man.") < unkind.gold("Thou art a man.")


def file_ratings(*wanted):
    """The ten individual ratings of some words, read straight from the lexicon file, as (10,) arrays."""
    found = {}
    with open(LEXICON_FILE, encoding="utf-8") as f:
        for line in f:
            token, _, _, ratings = line.rstrip("\n").split("\t")
            if token in wanted:
                found[token] = np.array(json.loads(ratings), dtype=float)          # the last entry wins
    return found


def vader(S):
    """VADER's compound of sums S, written out: S / sqrt(S^2 + 15)."""
    return S / np.sqrt(S * S + 15)


FILLER = " thou" * 9  # nine words that are not in the lexicon
N, B = -0.74, 0.293


def test_words():
    assert words("Don't cry, SWEET prince -- 'tis 3 o'clock!") == ["don't", "cry", "sweet", "prince", "tis",
                                                                   "o'clock"]


def test_vader_tokens():
    assert vader_tokens("No, I love thee -- 'tis :) sweet!") == ["No,", "I", "love", "thee", "--", "tis", ":)",
                                                                 "sweet"]


def assert_raters(panel, text, expected_sums):
    """Each rater's score is VADER's compound of the sum worked out by hand; gold is their mean."""
    assert panel.rater_scores(text) == pytest.approx(vader(expected_sums))
    assert panel.gold(text) == pytest.approx(vader(expected_sums).mean())


def test_panel_scores_by_hand(panel):
    text = "Thou art kind, my love, a villain"
    rt = file_ratings("kind", "love", "villain")
    assert_raters(panel, text, rt["kind"] + rt["love"] + rt["villain"])
    assert panel.gold(text + FILLER) == pytest.approx(panel.gold(text))       # no division by the length
    assert panel.gold("Thou art my lord.") == 0.0 and panel.gold("") == 0.0
    assert Panel(preference="unkind").gold(text) == pytest.approx(-panel.gold(text))
    assert panel.golds([text, "Thou art my lord."]).tolist() == pytest.approx([panel.gold(text), 0.0])
    assert panel.bag_of_words_gold(text) == pytest.approx(panel.gold(text))   # no rule fired


def test_the_issue_table_against_vadersentiment(panel):
    """With the lexicon's means and repeats counted, the panel is VADER: compounds printed by the package
    vaderSentiment 3.3.2 (SentimentIntensityAnalyzer().polarity_scores(t)["compound"]), measured once."""
    printed = {"Yes.": 0.4019, "Well.": 0.2732, "Thou art kind and gentle, sweet friend!": 0.9151,
               "I love thee, my good lord.": 0.7964, "I do not love thee.": -0.5216,
               "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!": 0.9469,
               "The plot was good, but the characters are uncompelling and the dialog is not great.": -0.7042,
               "At least it isn't a horrible book.": 0.431, "Today only kinda sux! But I'll get by, lol": 0.5249,
               "Not bad at all": 0.431, "love love love": 0.9274, "Thou art very very kind": 0.6087,
               "I am not so very kind": -0.4937, "He gave the kiss of death": -0.6124, "Without doubt kind": 0.6715}
    for text, compound in printed.items():
        assert panel.reference_compound(text) == pytest.approx(compound, abs=1e-4), text
    # and the panel (ten raters, each word once) judges them as a person would
    g = {t: panel.gold(t) for t in printed}
    assert g["I love thee, my good lord."] > g["Yes."] > g["Well."] > 0 > g["I do not love thee."]
    assert g["Thou art kind and gentle, sweet friend!"] > g["I love thee, my good lord."]


def test_each_word_counts_once_per_reply(panel):
    rt = file_ratings("yes", "love", "good")
    for text in ("Yes:", "Yes: Yes: Yes: Yes:", "Yes: yes, Yes"):
        assert_raters(panel, text, rt["yes"])
    assert_raters(panel, "Good love, good love, good.", rt["love"] + rt["good"])
    assert panel.reference_compound("love love") == pytest.approx(vader(np.array(3.2 * 2)))   # VADER: twice


def test_negation_rule(panel):
    rt = file_ratings("kind", "doubt")
    k = rt["kind"]
    for text in ("Thou art not kind", "I am not a kind man", "I was not, sir, kind", "Thou isn't kind"):
        assert_raters(panel, text, k * N)                                     # one, two or three words back
    assert_raters(panel, "I am not so very kind", (k + B * (1 + 0.95) * np.sign(k)) * N)   # boosted, negated
    assert_raters(panel, "Not that I am a kind man", k)                      # four words back: too far
    assert_raters(panel, "Without doubt kind", rt["doubt"] * N + k)           # "without doubt" negates nothing
    assert_raters(panel, "No kind word", k * N)                               # "no": valence 0, negates
    assert_raters(panel, "No, kind sir", k)                                   # "No," is not "no" (a quirk kept)
    assert panel.gold("No.") == 0.0


def test_booster_caps_and_least(panel):
    k = file_ratings("kind")["kind"]
    assert_raters(panel, "Thou art very kind", k + B * np.sign(k))
    assert_raters(panel, "Thou art very very kind", k + B * 1.95 * np.sign(k))     # x0.95 at distance 2
    assert_raters(panel, "Thou art slightly kind", k - B * np.sign(k))             # a dampener
    w = file_ratings("well")["well"]                                                 # four raters gave it 0
    assert (w == 0).sum() == 4
    assert_raters(panel, "Thou art very well", w + B * np.sign(w))                  # departure 3: 0 stays 0
    assert_raters(panel, "Thou art KIND", k + 0.733 * np.sign(k))                  # CAPS among lower case
    assert_raters(panel, "KIND", k)                                                # all caps: no emphasis
    assert_raters(panel, "Thou art least kind", k * N)
    assert_raters(panel, "Thou art at least kind", k)


def test_but_and_punctuation_rules(panel):
    rt = file_ratings("kind", "cruel")
    assert_raters(panel, "Thou art kind but cruel", 0.5 * rt["kind"] + 1.5 * rt["cruel"])
    S = rt["kind"]
    for marks, extra in (("!", 0.292), ("!!!!!!", 4 * 0.292), ("?", 0.0), ("??", 0.36), ("????", 0.96)):
        assert_raters(panel, "Kind" + marks, S + np.sign(S) * extra)


def test_idiom_rule(panel):
    # the phrase sets the valence of both its words of the lexicon, "kiss" and "death", whatever their ratings
    assert_raters(panel, "He gave the kiss of death", np.full(10, -1.5 * 2))
    why = []
    panel.sentiment_sum("He gave the kiss of death", why=why)
    assert any("idiom 'kiss of death'" in line for line in why)


def test_context_changes_order_the_bag_of_words_cannot_see(panel):
    a, b = "I do not love thee.", "Thou art a fool."
    assert panel.bag_of_words_gold(a) > 0 > panel.bag_of_words_gold(b)     # words alone: a is kinder
    assert panel.gold(a) < panel.gold(b) < 0                                   # read in context: b is


def test_lexicon_filtering_and_errors(tmp_path):
    good = tmp_path / "lex.txt"
    good.write_text(":)\t2.0\t0.5\t[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]\n"
                    "ok\t1.0\t0.0\t[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                    "can't stand\t-2.0\t0.0\t[-2, -2, -2, -2, -2, -2, -2, -2, -2, -2]\n"
                    "ok\t2.0\t0.0\t[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]\n")
    index, ratings = load_lexicon(str(good))
    assert list(index) == ["ok"] and ratings.tolist() == [[2.0] * 10]                # no emoticon; last wins
    bad = tmp_path / "bad_lex.txt"
    bad.write_text("ok\t1.0\t0.0\t[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nnice\t1.0\t0.0\t[1, 1, 1]\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2")):
        load_lexicon(str(bad))
    bad.write_text("ok\t1.0\t0.0\t5\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1")):
        load_lexicon(str(bad))
    assert len(Panel().index) > 7000
    rules = tmp_path / "rules.json"
    rules.write_text('{"negators": ["not"]}')
    with pytest.raises(ValueError, match=re.escape(str(rules))):
        Panel(rules=str(rules))


def test_pairwise_choice_frequency_is_bradley_terry(panel):
    a, b = "good" + FILLER, "sweet" + FILLER
    rt = file_ratings("good", "sweet")
    s_a, s_b = vader(rt["good"]), vader(rt["sweet"])                            # (10,) each
    assert panel.rater_score(a, 0) == pytest.approx(s_a[0])
    p = 1 / (1 + math.exp(-(s_a[0] - s_b[0]) / panel.temperature))
    rng = np.random.default_rng(0)
    wins = sum(panel.rank([a, b], rng, rater=0)[0][0] == 0 for _ in range(4000))
    assert wins / 4000 == pytest.approx(p, abs=0.03)
    # a random rater each time, with random.Random: the panel average of the ten sigmoids
    p_any = np.mean(1 / (1 + np.exp(-(s_a - s_b) / panel.temperature)))
    rng = random.Random(0)
    raters, wins = set(), 0
    for _ in range(4000):
        order, rater = panel.rank([a, b], rng)
        wins += order[0] == 0
        raters.add(rater)
    assert raters == set(range(10))
    assert wins / 4000 == pytest.approx(p_any, abs=0.03)


def test_three_way_ranking_frequencies_are_plackett_luce(panel):
    replies = ["good" + FILLER, "sweet" + FILLER, "thou" + FILLER]
    s = np.array([panel.rater_score(t, 0) for t in replies]) / panel.temperature
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(4000):
        order = tuple(panel.rank(replies, rng, rater=0)[0])
        counts[order] = counts.get(order, 0) + 1
    for perm in itertools.permutations(range(3)):
        x = s[list(perm)]
        p = math.prod(math.exp(x[k]) / sum(math.exp(v) for v in x[k:]) for k in range(3))
        assert counts.get(perm, 0) / 4000 == pytest.approx(p, abs=0.03)


def test_agree_prob_and_ceiling(panel):
    a, b = "good" + FILLER, "sweet" + FILLER
    rt = file_ratings("good", "sweet")
    s_a, s_b = vader(rt["good"]), vader(rt["sweet"])
    assert panel.gold(a) == pytest.approx(s_a.mean()) and s_a.mean() < s_b.mean()      # gold prefers b
    expected = np.mean(1 / (1 + np.exp((s_a - s_b) / panel.temperature)))
    assert panel.agree_prob(a, b) == pytest.approx(expected)
    assert panel.agree_prob(b, a) == pytest.approx(expected)                         # symmetric
    with pytest.raises(ValueError, match="equal gold"):
        panel.agree_prob(a, a)
    ceiling, n = panel.single_rater_ceiling([(a, b), (a, "good" + FILLER), ("thou", "art")])
    assert n == 1 and ceiling == pytest.approx(expected)
    with pytest.raises(ValueError, match="no pairs"):
        panel.single_rater_ceiling([("thou", "art")])


def test_panel_scores_thousands_of_replies_fast():
    panel = Panel()                                           # a fresh cache
    rng = random.Random(0)
    vocab = ["good", "sweet", "villain", "thou", "art", "my", "lord", "love", "hate", "friend", "the", "king"]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(3000)]
    t0 = time.process_time()                                  # CPU time: not slowed by other jobs
    golds = panel.golds(texts)
    assert time.process_time() - t0 < 2.0
    assert golds.shape == (3000,) and np.isfinite(golds).all()
