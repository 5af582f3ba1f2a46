"""
Reward: the reward model, the ranking losses that train it, and the simulated rater panel that stands in for
human raters.

    from reward import RewardModel, bradley_terry_loss, Panel, reply_scores
    rm = RewardModel.from_sft(load_checkpoint("out/sft.pt", made_by="train_sft.py"), readout="sum")
    r = reply_scores(rm, enc, prompts, replies)              # (B,) raw: the head's sum over each reply
    loss = bradley_terry_loss(r_chosen, r_rejected)          # [实战框架 §4.3.2]
    panel = Panel(); panel.gold("Thou art kind and gentle.") # the noise-free "human" score

    python reward.py "Good night, sweet prince."             # what the panel thinks of a reply

What is here, top to bottom:
  [实战框架 §5.2] the reward model: GPT body + scalar head (the critic reuses it)   RewardModel, reply_scores
         batching prompt + reply tokens, left-padded                                batch_replies
  [实战框架 §4.3.2] Bradley-Terry pairwise loss                                     bradley_terry_loss
  [实战框架 §5.2.2] the book's relu variant of it, with its bug                     book_relu_loss
  [实战框架 §4.3.1] Plackett-Luce listwise loss (K = 2 is Bradley-Terry)            plackett_luce_loss
  [流程与实践 §3.2] ratings (评分), as regression; metrics                            rating_loss
         the simulated rater panel (VADER's rules, each of 10 raters his own ratings) Panel
  (the feedback files, the four kinds and HH-RLHF as they are, are read by data/feedback.py)

What it simplifies: the reward is one number per reply (the head's sum over its tokens, train_rm.py's
default; or their mean; the class defaults to the mean, as rm.pt files without a "readout" were made), no
ensemble, no margin or length terms in the losses. The "humans" are ten raters who read a reply with VADER's
rules (negation, "but", boosters, emphasis), their own word ratings and a dislike of made-up words: context in
a window of three words, no grammar, relevance, repetition or sarcasm. A correction is not a loss of its own:
the reader turns it into a comparison (edited > original) plus an SFT example.
"""
import argparse
import json
import math
import os
import re
import string
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.prepare import encode_reply, play_words, words
from model import GPT, gpt_from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# [实战框架 §5.2] 奖励模型训练: the reward model is the SFT transformer with its vocabulary head swapped for one
# scalar head, read at every token of the reply and summed (readout "sum", train_rm.py's default):
#   r(x, y) = sum_{t in reply} (w . h_t + b),   h_t the final hidden state at reply token t
# or averaged (readout "mean": the sum / |y|, |y| the reply's tokens, its <|endoftext|> included). Why not
# the common readout at the last token alone (InstructGPT): a reply's kindness is spread over its words, and
# every word gets its own gradient (measured with an earlier panel: 0.737 against 0.685). Why a sum: the panel
# adds kind things up, so a sum has its shape. Measured (README "Reward model") it ranked held-out pairs a
# little better on one label set (0.724 against 0.693 with VADER's rules alone, 0.762 against 0.740 with
# made-up words at -1.0) and worse on another (0.635 against 0.710): within the swing between label draws.
# What decides is PPO: on a mean it learns one-kind-word replies ("I love."), since a mean pays a short reply
# with one kind word more than a long one with several; on a sum it keeps sentences. Every h_t has attended
# to the prompt.


READOUTS = ("mean", "sum")


class RewardModel(nn.Module):
    """GPT body + scalar head. `reward_mean` / `reward_std` are plain Python floats, not buffers: the
    trainer sets them after training (e.g. mean and std of raw scores on held-out replies); not in
    state_dict(), and checkpoint_dict() / from_checkpoint() carry them as the floats "reward_mean" and
    "reward_std". One place, one type: a float works on any device and can be assigned directly."""

    def __init__(self, cfg, readout="mean"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.readout = readout                                                # how the head's values become r
        self.body = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        # mean: std 1/sqrt(d+1), so with unit-variance LayerNorm outputs the initial scores have variance ~1;
        # sum: zeros, so a reply's initial score is not a sum of random per-token values
        std = 1.0 / math.sqrt(cfg.n_embd + 1) if readout == "mean" else 0.0
        nn.init.normal_(self.head.weight, mean=0.0, std=std)
        nn.init.zeros_(self.head.bias)
        self.reward_mean, self.reward_std = 0.0, 1.0

    def values(self, idx, pad=None):
        """The head at every position, (B, T): the PPO critic's V(s_t)."""
        h = self.body.hidden_states(idx, pad)                                 # (B, T, d)
        return self.scalar_head(h)                                            # (B, T)

    def forward(self, idx, reply_mask, pad=None):
        """Raw scores (B,): the head's mean (or sum) over the reply (reply_mask (B, T), True on it)."""
        per_token = self.values(idx, pad)                                     # (B, T)
        total = (per_token * reply_mask).sum(1)                               # (B,)
        return total if self.readout == "sum" else total / reply_mask.sum(1).clamp(min=1)   # (B,)

    def scalar_head(self, h):
        """(..., d) -> (...,) in float32, also under bf16 autocast: bf16 keeps 8 bits (scores like 1.15 and
        1.16 would round to the same number), and the differences of scores are what the ranking losses,
        the accuracy and PPO's advantages are made of. A d-vector dot product costs nothing in float32."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float()).squeeze(-1)                           # (...,)

    def score(self, idx, reply_mask, pad=None):
        """Normalised reward (raw - reward_mean) / reward_std, (B,): what PPO optimises."""
        return (self(idx, reply_mask, pad) - self.reward_mean) / self.reward_std   # (B,)

    @classmethod
    def from_sft(cls, ckpt, readout="mean"):
        """Start from an SFT checkpoint dict: body = its "model" weights, head freshly initialised."""
        body = gpt_from_checkpoint(ckpt)
        rm = cls(body.config, readout)
        rm.body = body
        return rm

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Rebuild from an rm.pt dict (what checkpoint_dict() returns, plus whatever the trainer added)."""
        missing = [k for k in ("head", "reward_mean", "reward_std") if k not in ckpt]
        if missing:
            raise ValueError(f"not a reward-model checkpoint (missing {missing}); make one with "
                             "`python train_rm.py`")
        rm = cls.from_sft(ckpt, ckpt.get("readout", "mean"))
        rm.head.load_state_dict(ckpt["head"])
        rm.reward_mean, rm.reward_std = float(ckpt["reward_mean"]), float(ckpt["reward_std"])
        return rm

    def checkpoint_dict(self):
        return {"model_args": asdict(self.body.config), "model": self.body.state_dict(),
                "head": self.head.state_dict(), "reward_mean": float(self.reward_mean),
                "reward_std": float(self.reward_std), "readout": self.readout, "kind": "rm"}


def batch_replies(enc, prompts_tokens, replies_tokens, block_size):
    """Put prompt + reply token lists in one left-padded batch for the reward model.

    Returns idx (B, T) long (pad token = EOT), pad (B,) long (left-pad counts) and reply_mask (B, T) bool,
    True on each row's reply tokens (its EOT included: with left padding every row ends with its reply).
    T is the longest row, not block_size. A row longer than block_size loses tokens from the START of the
    prompt (the reply is what is being judged); if the reply alone is longer than block_size, only its last
    block_size tokens are kept."""
    eot = enc.eot_token
    rows, n_reply = [], []
    for p, r in zip(prompts_tokens, replies_tokens, strict=True):
        if not r or r[-1] != eot:
            raise ValueError("each reply's tokens must end with EOT (use data.prepare.encode_reply)")
        keep = block_size - len(r)                                            # prompt tokens that fit
        rows.append((list(p[-keep:]) if keep > 0 else []) + list(r[-block_size:]))
        n_reply.append(min(len(r), block_size))
    T = max(len(row) for row in rows)
    idx = torch.full((len(rows), T), eot, dtype=torch.long)                   # (B, T)
    pad = torch.tensor([T - len(row) for row in rows], dtype=torch.long)      # (B,)
    for i, row in enumerate(rows):
        idx[i, T - len(row):] = torch.tensor(row, dtype=torch.long)
    reply_mask = torch.arange(T)[None, :] >= T - torch.tensor(n_reply)[:, None]   # (B, T)
    return idx, pad, reply_mask


def reply_scores(rm, enc, prompts, replies, normalised=False):
    """The reward model's scores of replies, each read after its prompt (a transcript ending in
    "\n\nAssistant:"), in one batch: (N,) float32, raw or normalised (what PPO optimises). Differentiable:
    train_rm trains through it; evaluation and chat.py call it under torch.no_grad()."""
    inner = getattr(rm, "module", rm)                                      # a DDP wrapper keeps it in .module
    prompt_ids, reply_ids = [enc.encode_ordinary(p) for p in prompts], [encode_reply(enc, r) for r in replies]
    idx, pad, reply_mask = batch_replies(enc, prompt_ids, reply_ids, inner.body.config.block_size)
    device = inner.head.weight.device
    raw = rm(idx.to(device), reply_mask.to(device), pad.to(device))           # (N,)
    return (raw - inner.reward_mean) / inner.reward_std if normalised else raw


# ----------------------------------------------------------------------------------------------------
# Losses on reward-model scores. Pure functions of tensors; "chosen" is always the preferred reply.

def bradley_terry_loss(r_chosen, r_rejected):
    """[实战框架 §4.3.2] Bradley-Terry 模型: P(chosen > rejected) = sigmoid(r_c - r_r);
    loss = mean(-log sigmoid(r_c - r_r)). logsigmoid never overflows, unlike log(sigmoid(.))."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()                        # scalar


def book_relu_loss(r_chosen, r_rejected):
    """The book's listing: mean(-log sigmoid(relu(r_c - r_r))). It is WRONG; kept for a test and an
    exercise. For a mis-ranked pair (r_c < r_r) relu gives 0, so the loss is the constant log 2 and its
    gradient is exactly zero: the model never learns from its mistakes. A correctly ranked pair is still
    pushed the right way, so the loss falls and the bug is easy to miss. Use bradley_terry_loss."""
    return -F.logsigmoid(F.relu(r_chosen - r_rejected)).mean()                # scalar


def plackett_luce_loss(scores, mask=None):
    """[实战框架 §4.3.1] Plackett-Luce 模型: scores (B, K) ordered best-first; the probability of that ranking is
    prod_k exp(s_k) / sum_{j>=k} exp(s_j), so loss = -mean_rows sum_k [s_k - logsumexp(s_k..s_K)].
    The last position contributes 0. mask (B, K) bool, True where a reply is present (rows with fewer
    than K replies; absent ones normally at the end, but any position works): absent replies are left
    out of every logsumexp and every sum. For K = 2 this is exactly bradley_terry_loss, since
    s_1 - logsumexp(s_1, s_2) = log sigmoid(s_1 - s_2)."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)                      # (B, K)
    # a very negative finite fill: exp(.) = 0 inside the logsumexp, and no inf - inf = nan in backward
    s = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)              # (B, K)
    lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)                     # (B, K) logsumexp(s_k..s_K)
    terms = torch.where(mask, s - lse, torch.zeros_like(s))                   # (B, K) log P(k-th pick)
    return -terms.sum(-1).mean()                                              # scalar


def rating_loss(r, ratings, lo=1, hi=5):
    """[流程与实践 §3.2] ratings (评分) by regression: loss = mean((r - target)^2), target = (rating - mid) /
    half_range in
    [-1, 1] (mid = (lo + hi) / 2, half_range = (hi - lo) / 2). lo, hi may be (B,) tensors for mixed
    scales. Why regression and not pairs: a lone rating (chat.py's /rate on one reply) has no partner to
    make a pair with, and regression uses every rating. The cost: it trusts each rater's absolute scale
    (one rater's 4 is another's 3), which comparisons never need to."""
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    target = (ratings - mid) / half                                           # (B,) in [-1, 1]
    return ((r - target) ** 2).mean()                                         # scalar


# ----------------------------------------------------------------------------------------------------
# The simulated rater panel: the default "human" of this project. Each of ten raters reads a reply with
# the rules of VADER (Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
# Social Media Text", ICWSM 2014: its five heuristics, with the constants and word lists of the authors'
# package vaderSentiment 3.3.2) and his own ratings of its words.

LEXICON_FILE = os.path.join(HERE, "data", "vader_lexicon.txt")
RULES_FILE = os.path.join(HERE, "data", "vader_rules.json")       # negators, boosters, dampeners, idioms
LEXICON_WORD_RE = re.compile(r"[a-z][a-z']*")
N_RATERS = 10
NEGATION = -0.74     # heuristic 5: a word negated in the three words before it: valence times this
BOOST = 0.293        # heuristic 3: a booster ("very") adds this intensity, a dampener ("slightly") takes it
CAPS = 0.733         # heuristic 2: a word in ALL CAPS, when the reply is not all caps, gains this intensity
BANG = 0.292         # heuristic 1: each "!" (at most 4) adds this to the size of the sum
QUESTIONS = 0.18     # 2 or 3 "?" add this each, 4 or more add 0.96 (vaderSentiment's _amplify_qm)
BUT_BEFORE, BUT_AFTER = 0.5, 1.5   # heuristic 4: words before the first "but" count half, after it 1.5x
ALPHA = 15           # compound = S / sqrt(S^2 + ALPHA): grows with the sum S and saturates at +-1
TEMPERATURE = 0.28   # a rater's choice noise on the compound scale: one rater agrees with gold ~0.77 (README)
UNREADABLE = -0.5    # a word a rater cannot read (in none of the plays) puts him off, about as "awkward" -0.6
GOLD_EPS = 1e-9      # gold scores closer than this count as equal (a tie: no right order to agree with)


def load_lexicon(path=LEXICON_FILE):
    """VADER lexicon lines `token<TAB>mean<TAB>std<TAB>[r1, ..., r10]` -> (word -> row, ratings (V, 10)).
    Only plain lowercase words are kept (no emoticons). Eight words (ok, lol, ...) appear twice, in the
    emoticon/slang block at the top and in the word list; the later (word list) entry wins."""
    index, rows = {}, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                token, ratings = parts[0], json.loads(parts[3])
                if len(parts) != 4 or len(ratings) != N_RATERS or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in ratings):
                    raise ValueError
            except (ValueError, IndexError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected token<TAB>mean<TAB>std<TAB>[{N_RATERS} "
                                 f"ratings], got {line.strip()[:80]!r}") from None
            if LEXICON_WORD_RE.fullmatch(token):
                if token not in index:
                    index[token] = len(rows)
                    rows.append(None)
                rows[index[token]] = ratings
    if not rows:
        raise ValueError(f"{path}: no word entries in the lexicon")
    return index, np.array(rows, dtype=np.float64)                            # (V, 10)


def load_rules(path=RULES_FILE):
    """data/vader_rules.json -> (negators set, modifiers {word or two words: +-BOOST}, idioms {phrase: v})."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        negators, idioms = set(r["negators"]), {k: float(v) for k, v in r["idioms"].items()}
        modifiers = {**{w: BOOST for w in r["boosters"]}, **{w: -BOOST for w in r["dampeners"]}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not VADER's rule lists ({e})") from None
    return negators, modifiers, idioms


def vader_tokens(text):
    """VADER's tokens: split at white space; punctuation stripped from both ends of a token unless that
    leaves two characters or fewer, when the token is kept whole (VADER keeps ":)" so; it also keeps "No."
    and "I," whole, and "No." then matches no word: a quirk kept, see Panel)."""
    out = []
    for t in text.split():
        bare = t.strip(string.punctuation)
        out.append(bare if len(bare) > 2 else t)
    return out


def compound(s):
    """VADER's compound score of a sentiment sum: S / sqrt(S^2 + 15), in (-1, 1)."""
    return s / np.sqrt(s * s + ALPHA)


class Panel:
    """Ten simulated raters who want the Bard to be kind (or, with preference="unkind", cruel).

    Scoring rule: VADER for each rater. Rater r (0..9) reads the reply's tokens (vader_tokens) and gives each
    word of the lexicon the rating rating_r(w) in -4..+4 that the r-th of VADER's ten human annotators gave
    it; then VADER's rules change those valences by their context (word_valence, the "but" rule, the
    punctuation rule: each a method below, its constant named above); the sum S_r becomes
        s_r = sign * S_r / sqrt(S_r^2 + 15)        (VADER's compound, sign +1 "kind", -1 "unkind")
    So a reply is kinder the more kind things it says, with diminishing returns and no division by its
    length; "not kind" is unkind; "but" shifts the weight to what follows; "very" and "!" intensify.
    gold(text) is the noise-free panel, the mean of the ten s_r. A reply with no lexicon word scores 0.

    Departures from VADER (each tested in tests/test_reward.py; measured against the package: README):
      1. each word of the lexicon counts once per reply: a later repeat has valence 0 (it still occupies
         its place in the windows of the rules). A person does not find "love love love love" four times
         as loving, and a sum without this would pay PPO to repeat its kindest word.
      2. the "but" rule scales the words by their position; VADER's code finds each valence's position with
         list.index, which scales the wrong word when two valences are equal.
      3. a booster, a dampener or ALL CAPS intensifies the rater's own valence: a word a rater rated 0 stays 0
         (VADER's code, written for the mean ratings, none of which is 0, would push it up or down).
      4. the lexicon's words only: no emoticons or emoji (the Bard uses none).
      5. a word that occurs in none of the plays (the SFT model's made-up words, "gracily") adds UNREADABLE
         to every rater's sum (unreadable_rule): a reader is put off by words he cannot read. Measured: with
         a sum-readout reward model PPO's real-word rate was 0.88 without it (0.989 on a mean-readout one,
         SFT 0.847); its size was chosen by PPO runs at -1.0, -0.75 and -0.5 (README "2. The panel"). An
         unkind rater (preference="unkind") is put off by them too.
    Kept from VADER on purpose: its tokens ("No." keeps its full stop and is no word, so a curt "No." is
    neutral, not unkind; but punctuation also ends a word's reach: in "No, I love thee" the "No," does not
    negate "love", which a reader agrees with) and its negation quirks (a word of the lexicon inside the
    window stops the negation check for that distance).

    Choice model. A rater ranks replies by Plackett-Luce on s_r / temperature: sort s_r / tau + Gumbel
    noise, which draws an exact Plackett-Luce sample; for two replies it is Bradley-Terry,
    P(a beats b) = sigmoid((s_r(a) - s_r(b)) / tau). So the rater is noisy where replies are close and
    near-certain where they are far apart: the data the losses of [实战框架 §4.3] 排序学习 assume."""

    def __init__(self, preference="kind", temperature=TEMPERATURE, path=LEXICON_FILE, rules=RULES_FILE,
                 known_words="plays"):
        if preference not in ("kind", "unkind"):
            raise ValueError(f"preference must be 'kind' or 'unkind', got {preference!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.preference, self.temperature = preference, temperature
        self.sign = 1.0 if preference == "kind" else -1.0
        self.index, self.ratings = load_lexicon(path)                         # dict, (V, 10)
        self.mean_ratings = self.ratings.mean(1).tolist()                     # (V,) VADER's own valences
        self.negators, self.modifiers, self.idioms = load_rules(rules)
        self.known_words = play_words() if known_words == "plays" else known_words   # None: every word known
        self._cache = {}

    # ---- VADER's sum, for every column of `table` (V, R): the ten raters' ratings, or the means (V, 1) ----

    def sentiment_sum(self, text, table=None, once=True, rules=True, why=None, unreadable=True):
        """S for each column of table (default: the ten raters) -> (R,). once=False counts repeats as VADER
        does; rules=False is the bag-of-words sum (each word its own rating, no context rule);
        unreadable=False leaves out departure 5; why, a list, collects a line for every rule that fired."""
        table, why = (self.ratings if table is None else table), ([] if why is None else why)
        toks = vader_tokens(text)
        low = [t.lower() for t in toks]
        mixed_caps = 0 < sum(t.isupper() for t in toks) < len(toks)         # some tokens ALL CAPS, not all
        seen, valences = set(), {}                                            # position -> (R,) valence
        for i, w in enumerate(low):
            if w not in self.index or w in self.modifiers or (w == "kind" and low[i + 1:i + 2] == ["of"]):
                continue                                                      # no valence of its own
            if once and w in seen:
                why.append(f"{toks[i]}: a repeat, counted once")
                continue
            seen.add(w)
            v = table[self.index[w]].astype(np.float64)                       # (R,)
            why.append(f"{toks[i]}: rated {self.mean_ratings[self.index[w]]:+.2f} on average")
            valences[i] = self.word_valence(v, i, toks, low, mixed_caps, table, why) if rules else v
        if rules:
            valences = self.but_rule(low, valences, why)
        total = sum(valences.values(), np.zeros(table.shape[1]))             # (R,)
        total = total + (self.unreadable_rule(text, why) if unreadable else 0.0)
        return self.punctuation_rule(text, total, why) if rules else total

    def unreadable_rule(self, text, why):
        """Departure 5: each distinct word that occurs in none of the plays (the SFT model's non-words, such
        as "gracily") adds UNREADABLE to every rater's sum: a reader is put off by words he cannot read."""
        if self.known_words is None:
            return 0.0
        unknown = sorted({w for w in words(text) if w not in self.known_words})
        if unknown:
            why.append(f"{', '.join(unknown)}: not a word of the plays, {UNREADABLE:+.1f} each")
        return self.sign * UNREADABLE * len(unknown)             # unkind raters are put off too

    def word_valence(self, v, i, toks, low, mixed_caps, table, why):
        """VADER's rules for the lexicon word at position i, in its order (sentiment_valence): "no", CAPS,
        then for each of the three words before it that is not itself in the lexicon: boosters, negation,
        and at distance 3 the idioms; last "least"."""
        if low[i] == "no" and i + 1 < len(low) and low[i + 1] in self.index:
            v = np.zeros_like(v)                          # "no" before a word negates it, has no valence
        if "no" in low[max(i - 2, 0):i] or (i > 2 and low[i - 3] == "no" and low[i - 1] in ("or", "nor")):
            v = table[self.index[low[i]]] * NEGATION
            why.append(f"{toks[i]}: after 'no', x{NEGATION}")
        if mixed_caps and toks[i].isupper():
            v = v + CAPS * np.sign(v)
            why.append(f"{toks[i]}: ALL CAPS, +{CAPS} intensity")
        for d in (1, 2, 3):
            if i >= d and low[i - d] not in self.index:
                v = self.booster_rule(v, toks[i - d], d, mixed_caps, why)
                v = self.negation_rule(v, low, i, d, why)
                if d == 3:
                    v = self.idiom_rule(v, low, i, why)
        if i > 0 and low[i - 1] == "least" and (i < 2 or low[i - 2] not in ("at", "very")):
            v = v * NEGATION                                                  # "least kind", not "at least"
            why.append(f"{toks[i]}: after 'least', x{NEGATION}")
        return v

    def booster_rule(self, v, word, d, mixed_caps, why):
        """Heuristic 3 (scalar_inc_dec): a booster d words before adds BOOST in the direction of the rater's
        valence, a dampener takes it away; x0.95 at distance 2, x0.9 at 3; ALL CAPS adds CAPS more."""
        if word.lower() not in self.modifiers:
            return v
        size = self.modifiers[word.lower()] + (CAPS if mixed_caps and word.isupper() else 0.0)
        size *= {1: 1.0, 2: 0.95, 3: 0.9}[d]
        why.append(f"{word}: modifier at distance {d}, {size:+.3f} intensity")
        return v + np.sign(v) * size

    def negation_rule(self, v, low, i, d, why):
        """Heuristic 5 (_negation_check): a negator ("not", "never", any word with "n't") d words before
        multiplies the valence by NEGATION; "never so/this" instead multiplies by 1.25 and "without doubt"
        leaves it. At distance 3 VADER's code reads "so"/"this" just before the word as "never so" too."""
        never_so = low[i - d] == "never" and low[i - d + 1] in ("so", "this")
        if d > 1 and (never_so or d == 3 and low[i - 1] in ("so", "this")):
            why.append(f"{low[i]}: 'never so/this', x1.25")
            return v * 1.25
        without_doubt = d > 1 and low[i - d] == "without" and "doubt" in low[i - d + 1:i]
        negated = self.negated(low[i - d]) and not without_doubt
        if negated:
            why.append(f"{low[i]}: negated by '{low[i - d]}' at distance {d}, x{NEGATION}")
            return v * NEGATION
        return v

    def negated(self, word):
        return word in self.negators or "n't" in word

    def idiom_rule(self, v, low, i, why):
        """VADER's special cases (_special_idioms_check): a phrase around the word ("to die for", "yeah
        right") sets its valence; a two-word dampener before it ("kind of", "sort of") adds -BOOST."""
        before = [" ".join(low[i - 1:i + 1]), " ".join(low[i - 2:i + 1]), " ".join(low[i - 2:i]),
                  " ".join(low[i - 3:i]), " ".join(low[i - 3:i - 1])]
        after = [" ".join(low[i:i + 2]) if i + 1 < len(low) else "",
                 " ".join(low[i:i + 3]) if i + 2 < len(low) else ""]
        hit = next((p for p in before if p in self.idioms), None)
        hit = next((p for p in reversed(after) if p in self.idioms), hit)
        if hit:
            v = np.full_like(v, self.idioms[hit])
            why.append(f"{low[i]}: idiom '{hit}', valence {self.idioms[hit]}")
        for gram in (before[3], before[4], before[2]):
            if gram in self.modifiers:
                v = v + self.modifiers[gram]
        return v

    def but_rule(self, low, valences, why):
        """Heuristic 4 (_but_check): around the first "but", the words before it count BUT_BEFORE, after it
        BUT_AFTER (by position: departure 2). valences: position -> (R,)."""
        if "but" not in low:
            return valences
        b = low.index("but")
        why.append(f"but: before x{BUT_BEFORE}, after x{BUT_AFTER}")
        return {j: v * (BUT_BEFORE if j < b else BUT_AFTER if j > b else 1.0) for j, v in valences.items()}

    def punctuation_rule(self, text, total, why):
        """Heuristic 1 (_amplify_ep, _amplify_qm): "!" and "?" add to the sum's size, in its direction."""
        bangs, questions = min(text.count("!"), 4), text.count("?")
        amp = bangs * BANG + (0.0 if questions < 2 else questions * QUESTIONS if questions <= 3 else 0.96)
        if amp:
            why.append(f"punctuation: {bangs} '!', {questions} '?': +{amp:.3f} intensity")
        return total + np.sign(total) * amp

    # ---- the panel's scores ----

    def rater_scores(self, text):
        """All ten raters' scores of one reply, (10,): VADER's compound of each rater's sum."""
        if text not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[text] = self.sign * compound(self.sentiment_sum(text))   # (10,)
        return self._cache[text]

    def rater_score(self, text, rater):
        return float(self.rater_scores(text)[rater])

    def gold(self, text):
        return float(self.rater_scores(text).mean())

    def golds(self, texts):
        return np.array([self.gold(t) for t in texts])                        # (N,)

    def bag_of_words_gold(self, text):
        """gold with VADER's context rules off: the mean compound of each rater's plain sum of the ratings of
        the reply's words (each once; departure 5, a word's own rating, stays). Pairs that it orders unlike
        gold are the "context pairs"."""
        return float((self.sign * compound(self.sentiment_sum(text, rules=False))).mean())

    def reference_compound(self, text):
        """VADER itself (to check against vaderSentiment): the lexicon's mean ratings, repeats counted, and
        no departure 5 (VADER reads every word)."""
        means = np.array(self.mean_ratings)[:, None]                          # (V, 1)
        return float(compound(self.sentiment_sum(text, means, once=False, unreadable=False))[0])

    def rank(self, replies, rng, rater=None):
        """One rater's Plackett-Luce ranking: (order best-first as a list of indices, rater id).
        rng: numpy Generator or random.Random; rater None draws one at random."""
        rater = _rater(rng) if rater is None else rater
        s = np.array([self.rater_scores(t)[rater] for t in replies])          # (K,)
        noisy = s / self.temperature + _gumbel(rng, len(replies))             # (K,)
        return [int(i) for i in np.argsort(-noisy, kind="stable")], rater

    def agree_prob(self, a, b):
        """Probability that one random rater orders a, b as gold does:
        mean_r sigmoid(sign(gold_a - gold_b) * (s_r(a) - s_r(b)) / tau). Needs unequal gold scores."""
        sa, sb = self.rater_scores(a), self.rater_scores(b)                  # (10,), (10,)
        g = sa.mean() - sb.mean()
        if abs(g) < GOLD_EPS:
            raise ValueError("the two replies have equal gold scores: there is no order to agree with")
        z = math.copysign(1.0, g) * (sa - sb) / self.temperature              # (10,)
        return float(np.mean(1.0 / (1.0 + np.exp(-z))))

    def vote(self, a, b):
        """The panel's vote for b over a: the probability that one random rater prefers b,
        mean_r sigmoid((s_r(b) - s_r(a)) / tau). 0.5 when the raters cannot tell them apart."""
        z = (self.rater_scores(b) - self.rater_scores(a)) / self.temperature   # (10,)
        return float(np.mean(1.0 / (1.0 + np.exp(-z))))

    def single_rater_ceiling(self, pairs):
        """Mean agree_prob over (a, b) pairs with unequal gold -> (ceiling, number of pairs used).
        How often a single rater's label agrees with gold: the accuracy against gold of the labels the
        reward model is trained on, a yardstick for the reward model's own gold accuracy."""
        probs = [self.agree_prob(a, b) for a, b in pairs if abs(self.gold(a) - self.gold(b)) >= GOLD_EPS]
        if not probs:
            raise ValueError("no pairs with different gold scores")
        return float(np.mean(probs)), len(probs)


def _gumbel(rng, k):
    """k standard Gumbel draws from a numpy Generator or a random.Random."""
    if isinstance(rng, np.random.Generator):
        return rng.gumbel(size=k)                                             # (k,)
    return np.array([-math.log(max(rng.expovariate(1.0), 1e-300)) for _ in range(k)])  # -log Exp(1)


def _rater(rng):
    return int(rng.integers(N_RATERS)) if isinstance(rng, np.random.Generator) else rng.randrange(N_RATERS)

def _numpy(x):
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def gold_accuracy(rm_a, rm_b, gold_a, gold_b):
    """Fraction of pairs, among those with unequal gold, that the reward model orders like gold
    (reward-model ties count as wrong) -> (accuracy, number of pairs used). Tensors or arrays."""
    rm_a, rm_b, gold_a, gold_b = map(_numpy, (rm_a, rm_b, gold_a, gold_b))
    g = gold_a - gold_b                                                       # (N,)
    used = np.abs(g) >= GOLD_EPS
    if not used.any():
        raise ValueError("no pairs with different gold scores")
    right = np.sign(rm_a - rm_b) == np.sign(g)                                # (N,)
    return float(right[used].mean()), int(used.sum())


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="What the simulated panel thinks of a reply, rule by rule.")
    ap.add_argument("reply", help="the reply to score, e.g. \"Good night, sweet prince.\"")
    args = ap.parse_args(argv)
    panel, why = Panel(), []
    panel.sentiment_sum(args.reply, why=why)
    print(f"gold {panel.gold(args.reply):+.4f}  raters {np.round(panel.rater_scores(args.reply), 3)}")
    print(f"VADER with the lexicon's means {panel.reference_compound(args.reply):+.4f}; bag-of-words sum "
          f"(no context rules) {panel.bag_of_words_gold(args.reply):+.4f}")
    print(f"tokens {vader_tokens(args.reply)}")
    print("\n".join("  " + line for line in why) or "  no word of the lexicon")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
