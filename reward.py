"""
Reward: the reward model and the ranking losses that train it.

    from reward import RewardModel, bradley_terry_loss, reply_scores
    rm = RewardModel.from_sft(load_checkpoint("out/sft.pt", made_by="train_sft.py"), readout="sum")
    r = reply_scores(rm, enc, prompts, replies)              # (B,) raw: the head's sum over each reply
    loss = bradley_terry_loss(r_chosen, r_rejected)          # [实战框架 §4.3.2]

    python reward.py "Good night, sweet prince."             # what the simulated panel thinks of a reply

What is here, top to bottom:
  [实战框架 §5.2] the reward model: GPT body + scalar head (the critic reuses it)   RewardModel, reply_scores
         batching prompt + reply tokens, left-padded                                batch_replies
  [实战框架 §4.3.2] Bradley-Terry pairwise loss                                     bradley_terry_loss
  [实战框架 §5.2.2] the book's relu variant of it, with its bug                     book_relu_loss
  [实战框架 §4.3.1] Plackett-Luce listwise loss (K = 2 is Bradley-Terry)            plackett_luce_loss
  [流程与实践 §3.2] ratings (评分), as regression                                    rating_loss
The labels come from people (data/feedback.py reads the four kinds of feedback and HH-RLHF as they are) or
from the simulated rater panel that stands in for them (data/panel.py: VADER's rules, ten raters each with
his own word ratings); `python reward.py` above shows the panel's verdict rule by rule.

What it simplifies: the reward is one number per reply (the head's sum over its tokens, train_rm.py's
default; or their mean; the class defaults to the mean, as rm.pt files without a "readout" were made), no
ensemble, no margin or length terms in the losses. A correction is not a loss of its own: the reader turns
it into a comparison (edited > original) plus an SFT example.
"""
import argparse
import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.panel import Panel, vader_tokens
from data.prepare import encode_reply
from model import GPT, gpt_from_checkpoint

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
