"""
Reward: the reward model, the ranking losses that train it, and the simulated rater panel that stands in for
human raters.

    from reward import RewardModel, bradley_terry_loss, Panel, reply_scores
    rm = RewardModel.from_sft(load_checkpoint("out/sft.pt", made_by="train_sft.py"))
    r = reply_scores(rm, enc, prompts, replies)              # (B,) raw: the head's mean over each reply
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
         the simulated rater panel (VADER lexicon, 10 raters)                       Panel
  (the feedback files, the four kinds and HH-RLHF as they are, are read by data/feedback.py)

What it simplifies: the reward is one number per reply (a mean over its tokens), no ensemble, no margin or
length terms in the losses. The "humans" are ten lexicon raters who judge kindness by the words a reply
uses, a bag of words with no grammar, negation or sarcasm. A correction is not a loss of its own: the
reader turns it into a comparison (edited > original) plus an SFT example.
"""
import argparse
import json
import math
import os
import re
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.prepare import words
from model import GPT, HERE, encode_reply, gpt_from_checkpoint

# ----------------------------------------------------------------------------------------------------
# [实战框架 §5.2] 奖励模型训练: the reward model is the SFT transformer with its vocabulary head swapped for one
# scalar head, read at every token of the reply and averaged:
#   r(x, y) = (1 / |y|) sum_{t in reply} (w . h_t + b),   h_t the final hidden state at reply token t
# (|y| counts the reply's tokens, its <|endoftext|> included). Why a mean and not the common readout at
# the last token alone (InstructGPT): measured here, it learns the panel's labels better from the same
# data (held-out gold accuracy 0.737 against 0.685, README "Reward model"): a reply's kindness is spread
# over its words, and the mean gives every word its own gradient. Every h_t has attended to the prompt.


class RewardModel(nn.Module):
    """GPT body + scalar head. `reward_mean` / `reward_std` are plain Python floats, not buffers: the
    trainer sets them after training (e.g. mean and std of raw scores on held-out replies); not in
    state_dict(), and checkpoint_dict() / from_checkpoint() carry them as the floats "reward_mean" and
    "reward_std". One place, one type: a float works on any device and can be assigned directly."""

    def __init__(self, cfg):
        super().__init__()
        self.body = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        # std 1/sqrt(d+1): with unit-variance LayerNorm outputs the initial scores have variance ~1
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(cfg.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.reward_mean, self.reward_std = 0.0, 1.0

    def values(self, idx, pad=None):
        """The head at every position, (B, T): the PPO critic's V(s_t)."""
        h = self.body.hidden_states(idx, pad)                                 # (B, T, d)
        return self.scalar_head(h)                                            # (B, T)

    def forward(self, idx, reply_mask, pad=None):
        """Raw scores (B,): the head's mean over the reply's tokens, reply_mask (B, T) True on them."""
        per_token = self.values(idx, pad)                                     # (B, T)
        return (per_token * reply_mask).sum(1) / reply_mask.sum(1).clamp(min=1)  # (B,)

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
    def from_sft(cls, ckpt):
        """Start from an SFT checkpoint dict: body = its "model" weights, head freshly initialised."""
        body = gpt_from_checkpoint(ckpt)
        rm = cls(body.config)
        rm.body = body
        return rm

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Rebuild from an rm.pt dict (what checkpoint_dict() returns, plus whatever the trainer added)."""
        missing = [k for k in ("head", "reward_mean", "reward_std") if k not in ckpt]
        if missing:
            raise ValueError(f"not a reward-model checkpoint (missing {missing}); make one with "
                             "`python train_rm.py`")
        rm = cls.from_sft(ckpt)
        rm.head.load_state_dict(ckpt["head"])
        rm.reward_mean, rm.reward_std = float(ckpt["reward_mean"]), float(ckpt["reward_std"])
        return rm

    def checkpoint_dict(self):
        return {"model_args": asdict(self.body.config), "model": self.body.state_dict(),
                "head": self.head.state_dict(), "reward_mean": float(self.reward_mean),
                "reward_std": float(self.reward_std), "kind": "rm"}


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
            raise ValueError("each reply's tokens must end with EOT (use model.encode_reply)")
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
# The simulated rater panel: the default "human" of this project.

LEXICON_FILE = os.path.join(HERE, "data", "vader_lexicon.txt")
LEXICON_WORD_RE = re.compile(r"[a-z][a-z']*")
N_RATERS = 10
MIN_WORDS = 1     # a reply shorter than this is judged as if padded with neutral words (see Panel)
GOLD_EPS = 1e-9  # gold scores closer than this count as equal (a tie: no right order to agree with)


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


def _gumbel(rng, k):
    """k standard Gumbel draws from a numpy Generator or a random.Random."""
    if isinstance(rng, np.random.Generator):
        return rng.gumbel(size=k)                                             # (k,)
    return np.array([-math.log(max(rng.expovariate(1.0), 1e-300)) for _ in range(k)])  # -log Exp(1)


def _rater(rng):
    return int(rng.integers(N_RATERS)) if isinstance(rng, np.random.Generator) else rng.randrange(N_RATERS)


class Panel:
    """Ten simulated raters who want the Bard to be kind (or, with preference="unkind", cruel).

    Scoring rule. Rater r (0..9) scores a reply by its kindness density:
        s_r = sign * sum_{w in distinct words(reply), w in lexicon} rating_r(w) / max(n, min_words)
    where n counts ALL the reply's words (in the lexicon or not, repeats included), rating_r(w) in -4..+4
    is the rating the r-th of VADER's ten human annotators gave the word, and sign = +1 for "kind", -1 for
    "unkind". Why per word: dividing by the length means a reply cannot win by being long (piling on
    words), and one kind word in a short reply counts more than the same word in a long speech. Why each
    word once: a person does not find a kind word kinder for hearing it five times, so "Yes: Yes: Yes:"
    scores a third of "Yes:" (the repeats still lengthen the reply). Why min_words: a reply shorter than
    min_words words is judged as if the missing words were neutral, so a curt "Love." is not the kindest
    possible answer to every question (the choice of min_words is measured in the README). Why individual
    ratings and not the lexicon's mean: the ten people disagree, so the raters disagree as people do.
    gold(text) is the noise-free panel: the mean of the ten s_r (the file's rounded mean column is not
    used). A reply with no lexicon words scores 0.

    Choice model. A rater ranks replies by Plackett-Luce on s_r / temperature: sort s_r / tau + Gumbel
    noise, which draws an exact Plackett-Luce sample; for two replies it is Bradley-Terry,
    P(a beats b) = sigmoid((s_r(a) - s_r(b)) / tau). So the rater is noisy where replies are close and
    near-certain where they are far apart: the data the losses of [实战框架 §4.3] 排序学习 assume."""

    def __init__(self, preference="kind", temperature=0.1, min_words=MIN_WORDS, path=LEXICON_FILE):
        if preference not in ("kind", "unkind"):
            raise ValueError(f"preference must be 'kind' or 'unkind', got {preference!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {min_words}")
        self.preference, self.temperature, self.min_words = preference, temperature, min_words
        self.sign = 1.0 if preference == "kind" else -1.0
        self.index, self.ratings = load_lexicon(path)                         # dict, (V, 10)

    def rater_scores(self, text):
        """All ten raters' scores of one reply, (10,)."""
        ws = words(text)
        rows = [self.index[w] for w in set(ws) if w in self.index]           # each word once
        return self.sign * self.ratings[rows].sum(0) / max(len(ws), self.min_words)  # (10,)

    def rater_score(self, text, rater):
        return float(self.rater_scores(text)[rater])

    def gold(self, text):
        return float(self.rater_scores(text).mean())

    def golds(self, texts):
        return np.array([self.gold(t) for t in texts])                        # (N,)

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
    ap = argparse.ArgumentParser(description="What the simulated rater panel thinks of a reply.")
    ap.add_argument("reply", help="the reply to score, e.g. \"Good night, sweet prince.\"")
    args = ap.parse_args(argv)
    panel = Panel()
    found = [w for w in words(args.reply) if w in panel.index]
    print(f"gold {panel.gold(args.reply):+.4f}  raters {np.round(panel.rater_scores(args.reply), 3)}")
    print(f"{len(words(args.reply))} words, in the lexicon: {found}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
