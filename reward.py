"""
Reward: the reward model and the ranking losses that train it.

    python reward.py "Good night, sweet prince."             # what the simulated panel thinks of a reply

What is here, top to bottom:
  [实战框架 §5.2] the reward model: GPT body + scalar head (the critic reuses it)   RewardModel, reply_scores
         batching prompt + reply tokens, left-padded                                batch_replies
  [实战框架 §4.3.2] Bradley-Terry pairwise loss                                     bradley_terry_loss
  [实战框架 §5.2.2] the book's relu variant of it, with its bug                     book_relu_loss
  [实战框架 §4.3.1] Plackett-Luce listwise loss (K = 2 is Bradley-Terry)            plackett_luce_loss
  [流程与实践 §3.2] ratings (评分), as regression                                    rating_loss
What it simplifies: the reward is one number per reply (the head's sum over its tokens, train_rm.py's
default; or their mean, the class default, as rm.pt files without a "readout" were made), no ensemble, no
margin or length terms in the losses; the labels come from people (data/feedback.py) or the panel.
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


# [实战框架 §5.2] 奖励模型训练: the reward model is the SFT transformer with its vocabulary head swapped for one
# scalar head, read at every token of the reply and summed (readout "sum", train_rm.py's default):
#   r(x, y) = sum_{t in reply} (w . h_t + b),   h_t the final hidden state at reply token t (seen the prompt)
# or averaged ("mean": the sum / |y|, EOT included). Not the last token (InstructGPT's): every word gets its
# own gradient (0.737 against 0.685). A sum has the panel's shape: PPO on a mean learns "I love." (README).
READOUTS = ("mean", "sum")


class RewardModel(nn.Module):
    """GPT body + scalar head; `reward_mean` / `reward_std` are plain floats, in checkpoint_dict() only."""

    def __init__(self, cfg, readout="mean"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.readout = readout                                                # how the head's values become r
        self.body = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        # mean: std 1/sqrt(d+1), initial scores of variance ~1; sum: zeros, not a sum of random token values
        std = 1.0 / math.sqrt(cfg.n_embd + 1) if readout == "mean" else 0.0
        nn.init.normal_(self.head.weight, mean=0.0, std=std)
        nn.init.zeros_(self.head.bias)
        self.reward_mean, self.reward_std = 0.0, 1.0

    def values(self, idx, pad=None):
        """The head at every position, (B, T): the PPO critic's V(s_t). In float32, also under bf16 autocast:
        bf16 keeps 8 bits (1.15 and 1.16 round alike), and score differences are what the ranking losses and
        PPO's advantages are made of."""
        h = self.body.hidden_states(idx, pad)                                 # (B, T, d)
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float()).squeeze(-1)                           # (B, T)

    def forward(self, idx, reply_mask, pad=None):
        """Raw scores (B,): the head's mean (or sum) over the reply (reply_mask (B, T), True on it)."""
        total = (self.values(idx, pad) * reply_mask).sum(1)                   # (B,)
        return total if self.readout == "sum" else total / reply_mask.sum(1).clamp(min=1)   # (B,)

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
    """Prompt + reply token lists in one left-padded batch: idx (B, T) (pad = EOT), pad (B,) left-pad counts,
    reply_mask (B, T) True on each reply (its EOT included); T the longest row. Over block_size, a row loses
    the START of its prompt (the reply is what is judged), then the start of its reply."""
    eot = enc.eot_token
    rows, n_reply = [], []
    for p, r in zip(prompts_tokens, replies_tokens, strict=True):
        if not r or r[-1] != eot:
            raise ValueError("each reply's tokens must end with EOT (use data.prepare.encode_reply)")
        keep = block_size - len(r)                                            # prompt tokens that fit
        rows.append((list(p[-keep:]) if keep > 0 else []) + list(r[-block_size:]))
        n_reply.append(min(len(r), block_size))
    T = max(len(row) for row in rows)
    idx = torch.tensor([[eot] * (T - len(row)) + row for row in rows], dtype=torch.long)   # (B, T)
    pad = torch.tensor([T - len(row) for row in rows], dtype=torch.long)      # (B,)
    reply_mask = torch.arange(T)[None, :] >= T - torch.tensor(n_reply)[:, None]   # (B, T)
    return idx, pad, reply_mask


def reply_scores(rm, enc, prompts, replies, normalised=False):
    """Scores (N,) float32, raw or normalised, of replies each read after its prompt (a transcript ending in
    "\n\nAssistant:"), in one batch. Differentiable: train_rm trains through it."""
    inner = getattr(rm, "module", rm)                                      # a DDP wrapper keeps it in .module
    prompt_ids, reply_ids = [enc.encode_ordinary(p) for p in prompts], [encode_reply(enc, r) for r in replies]
    idx, pad, reply_mask = batch_replies(enc, prompt_ids, reply_ids, inner.body.config.block_size)
    raw = rm(*(t.to(inner.head.weight.device) for t in (idx, reply_mask, pad)))   # (N,)
    return (raw - inner.reward_mean) / inner.reward_std if normalised else raw


# Losses on reward-model scores. Pure functions of tensors; "chosen" is always the preferred reply.
def bradley_terry_loss(r_chosen, r_rejected):
    """[实战框架 §4.3.2] Bradley-Terry 模型: P(chosen > rejected) = sigmoid(r_c - r_r);
    loss = mean(-log sigmoid(r_c - r_r)). logsigmoid never overflows, unlike log(sigmoid(.))."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()                        # scalar


def book_relu_loss(r_chosen, r_rejected):
    """The book's mean(-log sigmoid(relu(r_c - r_r))), WRONG (kept for a test and an exercise): a mis-ranked
    pair gives the constant log 2, gradient 0, never learnt from; right pairs still push, so the bug hides."""
    return -F.logsigmoid(F.relu(r_chosen - r_rejected)).mean()                # scalar


def plackett_luce_loss(scores, mask=None):
    """[实战框架 §4.3.1] Plackett-Luce 模型: scores (B, K) ordered best-first; the probability of that ranking is
    prod_k exp(s_k) / sum_{j>=k} exp(s_j), so loss = -mean_rows sum_k [s_k - logsumexp(s_k..s_K)].
    mask (B, K): True where a reply is present. K = 2 is BT: s_1 - lse(s_1, s_2) = log sigmoid(s_1 - s_2)."""
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask   # (B, K)
    # a very negative finite fill: exp(.) = 0 inside the logsumexp, and no inf - inf = nan in backward
    s = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)              # (B, K)
    lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)                     # (B, K) logsumexp(s_k..s_K)
    terms = torch.where(mask, s - lse, torch.zeros_like(s))                   # (B, K) log P(k-th pick)
    return -terms.sum(-1).mean()                                              # scalar


def rating_loss(r, ratings, lo=1, hi=5):
    """[流程与实践 §3.2] ratings (评分) by regression: loss = mean((r - target)^2), target = (rating - mid) / half
    in [-1, 1], mid = (lo + hi) / 2, half = (hi - lo) / 2; lo, hi may be (B,) tensors. A lone rating has no
    partner to pair with; the cost: it trusts each rater's absolute scale (one's 4 is another's 3)."""
    target = (ratings - (hi + lo) / 2) / ((hi - lo) / 2)                      # (B,) in [-1, 1]
    return ((r - target) ** 2).mean()                                         # scalar


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


if __name__ == "__main__":
    main()
