"""
The maths of PPO for RLHF, written once ([实战框架 §4.2] PPO 算法: [实战框架 §4.2.1] 重要性采样, [实战框架 §4.2.2]
信赖域方法, [实战框架 §4.2.3] 广义优势估计;
the policy-gradient road to it in [流程与实践 §4.1] 策略梯度算法, [流程与实践 §4.3] Actor-Critic算法, [强化对齐 §4.2]
策略梯度定理与REINFORCE算法 and [强化对齐 §4.3]). train_ppo.py imports these; each is a short pure function with a
test against hand-worked numbers or a plain Python loop in tests/test_ppo.py.

What is here, top to bottom: the maths first, then the fast paths, each equal to a plain form (tested).
  log pi(a_t | s_t) of the sampled tokens; critic values V(s_t)   response_logprobs, response_values
  KL estimators k1, k3; the KL coefficient beta                     kl_k1, kl_k3, AdaptiveKLController
  per-token rewards: -beta * KL, the score at the last token       per_token_rewards, apply_no_eos_penalty
  [实战框架 §4.2.3] generalised advantage estimation                 gae
  masked statistics and advantage whitening                         masked_mean, masked_var, whiten
  [实战框架 §4.2.1-§4.2.2] ratio, clipped surrogate, value loss      ppo_loss
  diagnostics                                                       explained_variance
  fast paths: chunked log-probs (memory), discounted sums as one matrix product (speed), torch.compile

The MDP this code solves, token by token ([难点和问题 §4.1] 强化学习基本数学模型,
[强化对齐 §4.1] 马尔可夫决策过程的数学表示). One reply is one episode. State s_t: the prompt plus the reply tokens
sampled so far. Action a_t: the next token, one of the tokenizer's 8,192 ids. Transition ([强化对齐 §4.1.1]):
deterministic, s_{t+1} is s_t with a_t appended (P(s'|s, a) = 1 for that s', 0 for any other); the episode
ends when a_t is <|endoftext|> or the reply reaches its token budget (train_ppo's --max_new_tokens). Reward
([强化对齐 §4.1.2]; the chapter's R_{t+1} is our r_t): r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) on
every reply token, plus the reward model's score of the whole reply on its last token (per_token_rewards;
train_ppo.shape_rewards first clips the score, and replaces it for a reply that never ended). Policy
([强化对齐 §4.1.3]): pi(a_t|s_t) is the language model's softmax over the next token; response_logprobs gives
log pi of the sampled ones. The return from t is sum_k gamma^k r_{t+k} to the end of the reply; the value
V^pi(s_t) is its expectation under pi, which the critic V_phi(s_t) (response_values) learns. gamma is the
discount, train_ppo's --gamma, 1 by default (a reply is short and always ends); gae turns these r_t and
V(s_t) into advantages.

From REINFORCE to PPO, in this file's words. The policy gradient is E[sum_t grad log pi(a_t|s_t) A_t]
([流程与实践 §4.1], [强化对齐 §4.2.1]); REINFORCE uses the return for A_t, and with a baseline b(s_t) the return
minus the baseline ([强化对齐 §4.2.3]). ppo_loss's surrogate has exactly this gradient while the ratio is 1,
i.e. on the first minibatch step after a rollout: with ppo_epochs 1 and one minibatch (minibatch_size =
batch_size) every step is such a step, and the clip never acts. Then gae(lam=1) makes A_t = (the return
from t) - V(s_t): REINFORCE with the critic as baseline. gae(lam=0) makes A_t = r_t + gamma V(s_{t+1}) -
V(s_t), the one-step advantage of the actor-critic algorithm ([强化对齐 §4.3.2], [流程与实践 §4.3]). PPO
keeps the critic and takes several clipped steps on each rollout (tests/test_ppo.py checks all three).

Shapes. A rollout is `seq` (B, P+R): left-padded prompts (`pad` (B,) pad tokens at the start of each row),
then R response tokens. `resp_mask` (B, R) is True on the generated tokens up to and including the first
EOT (a prefix of each row). Every per-token tensor (logprobs, ref_logprobs, values, rewards, advantages,
returns) is (B, R) and lines up with the response tokens. Masked positions never influence any result:
they are replaced by zero with torch.where before any arithmetic, so even inf there does no harm.

Two different KLs, measured against two different policies:
  * the reward penalty (per_token_rewards) is KL(pi || pi_ref) against the FROZEN SFT reference model,
    estimated per token with k1 = log pi - log pi_ref on the tokens the policy sampled. It keeps the
    policy close to the model it started from, so it cannot drift into reward-model exploits.
  * approx_kl (ppo_loss stats) is KL(pi_old || pi_theta) between the policy that produced the rollout
    (old_logprobs) and the policy being updated now, estimated with k3. It only measures how far one
    PPO update has moved the policy (a health check, often used for early stopping).

What it simplifies: one response per prompt and a single reward at the end (no per-step rewards from the
reward model); the KL penalty is the per-token k1 (no k2, no full-distribution KL); rows are episodes
that end at the first EOT (or at the token budget, see apply_no_eos_penalty); no value-head normalisation
(train_ppo.shape_rewards clips the reward model's score); all averages are plain masked means over every valid
token of the (mini)batch.
"""
import functools

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# log pi(a_t | s_t): the log-probability of each sampled token, the quantity every PPO formula is built on.
#
# Temperature: the rollout sampled from softmax(logits / temperature), so the policy pi whose probability
# ratios PPO takes ([实战框架 §4.2.1]) IS that tempered distribution. Computing log-probs at another temperature
# would score the tokens under a distribution we never sampled from: the ratio would not be 1 before the
# first update and the KL penalty would be wrong. So policy, old policy and reference all use the SAME
# temperature as sampling. (Top-k / top-p change the distribution too: sample PPO rollouts without them.)

def response_logprobs(model, seq, pad, resp_len, temperature=1.0, with_entropy=False, chunk_size=None,
                      resp_mask=None):
    """log pi(response token j | prompt, tokens < j) for every response position: (B, R) [, entropy (B, R)].

    The logits that predict token P+j sit at position P-1+j (a causal LM predicts the NEXT token), so the
    R predicting positions are P-1 .. P+R-2. Use the same call, with the same temperature, for the policy,
    the old policy and the frozen reference. Turn dropout off (model.eval() or dropout=0), or the policy
    would disagree with itself and the ratio would not be 1 before the first update.
    With resp_mask (B, R), only the valid reply tokens go through the vocabulary projection (the positions
    after <|endoftext|> are skipped, often more than half of them) and the rest are returned as 0.
    chunk_size None: the plain form (logprobs_plain) unless its (N, V) logits would pass CHUNKED_ABOVE
    bytes, then the chunked one (logprobs_from_hidden, 1,024 rows at a time); a number: always chunked."""
    P = seq.size(1) - resp_len
    if resp_len < 1 or P < 1:
        raise ValueError(f"need at least one prompt and one response token: seq {tuple(seq.shape)}, "
                         f"resp_len {resp_len}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    hidden = model.hidden_states(seq, pad)                                    # (B, P+R, d)
    h = hidden[:, P - 1:-1]                                               # (B, R, d) states before the tokens
    tokens = seq[:, P:]                                                       # (B, R)
    W = model.lm_head.weight                                                  # (V, d) tied to the embedding
    n_rows = int(resp_mask.sum()) if resp_mask is not None else tokens.numel()
    if chunk_size is None and n_rows * W.size(0) * 4 > CHUNKED_ABOVE:         # bytes of (N, V) float32 logits
        chunk_size = 1024
    if chunk_size is None:
        logprobs = functools.partial(logprobs_plain, with_entropy=with_entropy)
    else:
        logprobs = functools.partial(logprobs_from_hidden, chunk_size=chunk_size, with_entropy=with_entropy)
    if resp_mask is None:
        return logprobs(h, W, tokens, temperature)                            # (B, R) [, (B, R)]
    out = logprobs(h[resp_mask], W, tokens[resp_mask], temperature)           # (N_valid,) [, (N_valid,)]
    out = out if with_entropy else (out,)
    full = []
    for x in out:                                                             # scatter back into (B, R)
        y = torch.zeros(tokens.shape, device=x.device, dtype=x.dtype)         # (B, R) 0 after EOT
        y[resp_mask] = x
        full.append(y)
    return tuple(full) if with_entropy else full[0]


CHUNKED_ABOVE = 2 ** 30   # bytes: larger (N, V) logits go through logprobs_from_hidden (the cpu and gpu
                          # presets' are 50 MB and 0.5 GB: plain; tests/bench.py measures both forms)


def logprobs_plain(hidden, weight, tokens, temperature=1.0, with_entropy=False):
    """log softmax(hidden @ weight^T / temperature)[tokens], all (N, V) logits at once: hidden (..., d),
    weight (V, d), tokens (...) -> (...) float32 [, the entropy (...) of the tempered distribution]."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):   # float32 under bf16 autocast too
        logits = hidden.float() @ weight.float().t() / temperature           # (..., V)
    logp_all = F.log_softmax(logits, dim=-1)                                  # (..., V)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)                 # (...) the sampled tokens'
    if not with_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)                         # (...), (...) H = -sum p log p


def response_values(critic, seq, pad, resp_len):
    """V(s_j): the critic's value of the state just before response token j is emitted, (B, R).

    `critic` is anything with .values(idx, pad) -> (B, T) (reward.RewardModel). As for log-probs, the
    state before token P+j ends at position P-1+j. The state after the last token is never needed: the
    episode has ended there, so its value is 0 by definition (see gae)."""
    P = seq.size(1) - resp_len
    if resp_len < 1 or P < 1:
        raise ValueError(f"need at least one prompt and one response token: seq {tuple(seq.shape)}, "
                         f"resp_len {resp_len}")
    values = critic.values(seq, pad)                                          # (B, P+R)
    return values[:, P - 1:-1]                                                # (B, R)


# ----------------------------------------------------------------------------------------------------
# KL(pi || pi_ref) = E_{a ~ pi}[log pi(a) - log pi_ref(a)], estimated from the ONE token a that pi sampled
# at each position (the full sum over the vocabulary would cost a reference forward pass per word).
# With x = pi_ref(a) / pi(a) (J. Schulman, "Approximating KL Divergence", 2020):
#   k1 = -log x                unbiased; a single sample can be negative; high variance
#   k3 = (x - 1) - log x       unbiased (E_pi[x - 1] = 0); always >= 0 (log x <= x - 1); lower variance
# The book has no KL penalty: it comes from Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022), the
# recipe behind [实战框架 §7.3.1] InstructGPT.

def kl_k1(logprobs, ref_logprobs):
    return logprobs - ref_logprobs                                            # (B, R)


def kl_k3(logprobs, ref_logprobs):
    log_x = ref_logprobs - logprobs                                           # (B, R) log pi_ref/pi
    return torch.expm1(log_x) - log_x                                         # (B, R) >= 0


# The KL coefficient beta. Adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
# Preferences"): move beta so the measured KL approaches `target`:
#   e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
# n_steps is how many samples (episodes) the KL was measured on; horizon sets how fast beta reacts.

class AdaptiveKLController:
    def __init__(self, init_beta, target, horizon):
        self.value, self.target, self.horizon = init_beta, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    def __init__(self, beta):
        self.value = beta

    def update(self, current_kl, n_steps):
        return self.value


# ----------------------------------------------------------------------------------------------------
# The reward PPO maximises, per token t of a reply (InstructGPT's KL-penalised reward; not in the book):
#   r_t = -beta * (log pi(a_t) - log pi_ref(a_t))           on every valid reply token (k1 KL penalty)
#       + score (the reward model's verdict on the reply)   added on the reply's LAST valid token
# Summed over the reply: score - beta * (k1 estimate of the sequence KL(pi || pi_ref)).

def per_token_rewards(scores, logprobs, ref_logprobs, resp_mask, beta):
    """scores (B,), logprobs / ref_logprobs (B, R) of the sampled tokens, resp_mask (B, R) bool.
    Returns rewards (B, R) and kl (B, R) (k1 per token), both 0 on masked positions."""
    kl = torch.where(resp_mask, kl_k1(logprobs, ref_logprobs), 0.0)          # (B, R)
    rewards = -beta * kl                                                      # (B, R)
    n_valid = resp_mask.sum(dim=1)                                            # (B,)
    last = (n_valid - 1).clamp(min=0)                                     # (B,) index of the last valid token
    score = torch.where(n_valid > 0, scores.to(rewards.dtype), 0.0)          # (B,) an empty row gets nothing
    rewards = rewards.scatter_add(1, last[:, None], score[:, None])          # (B, R)
    return rewards, kl


def apply_no_eos_penalty(scores, ended, penalty=None):
    """Replies that never emitted EOT within the token budget (`ended` (B,) False) were cut off mid-way:
    the reward model scores a truncated text it never saw in training. Replace (not add to) their score
    by `penalty` (e.g. -1.0), so the policy learns to finish its sentences. penalty=None: no change."""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))      # (B,)


# ----------------------------------------------------------------------------------------------------
# [实战框架 §4.2.3] 广义优势估计 (GAE), for each row b with T_b valid tokens:
#   delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     V(s_{T_b}) = 0 (the episode ended with the reply)
#   A_t = sum_{l=0}^{T_b - t - 1} (gamma * lambda)^l * delta_{t+l}
# The book's last term is (gamma lambda)^{T-t+1} delta_{T-1}: a typo under any indexing (the term that
# multiplies delta_{T-1} has exponent T-1-t; see the README's errata). The sum over l is a reverse
# discounted sum of the deltas, A_t = delta_t + gamma * lambda * A_{t+1} (discounted_cumsum, below).
# Returns (the critic's regression target) R_t = A_t + V(s_t), the lambda-return.
# lam = 0: A_t = delta_t, the one-step TD advantage of actor-critic ([强化对齐 §4.3.2]).
# lam = 1: A_t = (sum of the rewards from t, discounted) - V(s_t), REINFORCE with a baseline ([强化对齐 §4.2.3]).

def gae(rewards, values, resp_mask, gamma=1.0, lam=0.95, matrix=False):
    """rewards, values (B, R), resp_mask (B, R) bool prefix -> advantages, returns (B, R), 0 where masked.
    The discounted sum is the loop backwards over t (discounted_cumsum_loop, the plain form); with
    matrix=True, or compiled (fused(gae)), one matrix product (discounted_cumsum: a loop would be unrolled
    R times)."""
    rewards = torch.where(resp_mask, rewards.detach(), 0.0)                  # (B, R) rollout data, no grad
    values = torch.where(resp_mask, values.detach(), 0.0)                    # (B, R) V = 0 after the reply
    next_values = F.pad(values[:, 1:], (0, 1))                               # (B, R) V(s_{t+1}), 0 at the end
    deltas = rewards + gamma * next_values - values                           # (B, R) delta_t, 0 where masked
    cumsum = discounted_cumsum if matrix or torch.compiler.is_compiling() else discounted_cumsum_loop
    advantages = cumsum(deltas, gamma * lam)                    # (B, R) A_t = sum_l (gamma lam)^l delta_{t+l}
    advantages = torch.where(resp_mask, advantages, 0.0)                      # (B, R)
    returns = torch.where(resp_mask, advantages + values, 0.0)                # (B, R)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------
# Masked statistics: every average runs over the valid tokens only (masked entries are set to 0 first).

def masked_mean(x, mask, dim=None, total=None):
    """Mean of x over the entries where mask is True (over `dim`, or all). total: how a sum is totalled over
    the whole batch when each process of a torchrun run holds its share of it (train_ppo.py passes
    data.plumbing.all_sum: the whole batch's mean is the sum of the processes' sums over the sum of their
    counts); None: this tensor is the whole batch."""
    x = torch.where(mask, x, 0.0)
    if dim is None:
        total = total or (lambda t: t)
        return total(x.sum()) / total(mask.sum()).clamp(min=1)                # ()
    return x.sum(dim) / mask.sum(dim).clamp(min=1)                            # x's shape without `dim`


def masked_var(x, mask, unbiased=True, total=None):
    """Variance over all valid entries (with Bessel's correction n / (n - 1) if unbiased)."""
    centred = torch.where(mask, x - masked_mean(x, mask, total=total), 0.0)
    var = masked_mean(centred ** 2, mask, total=total)                        # ()
    if unbiased:
        n = total(mask.sum()) if total else mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x, mask, shift_mean=True, eps=1e-8, total=None):
    """(x - mean) / std over the valid tokens; 0 where masked. Applied to advantages (over the whole
    rollout batch, `total` as in masked_mean) so the policy-gradient step has the same scale whatever the
    reward scale. shift_mean=False only rescales (keeps the mean), e.g. for rewards."""
    mean = masked_mean(x, mask, total=total)                                  # () over the whole batch
    var = masked_var(x, mask, total=total)                                    # ()
    out = (x - mean) * torch.rsqrt(var + eps)                                 # same shape as x
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


# ----------------------------------------------------------------------------------------------------
# [实战框架 §4.2.1] 重要性采样: the rollout was sampled by the old policy, the update changes theta:
#   r_t(theta) = pi_theta(a_t | s_t) / pi_old(a_t | s_t) = exp(log pi_theta - log pi_old)
# [实战框架 §4.2.2] 信赖域方法 (the chapter's formula is PPO's clip, not TRPO's KL constraint), maximised; we
# minimise its negative:
#   L^CLIP = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]
# The min makes it pessimistic: the policy gains nothing from moving r_t beyond 1 +- eps in the direction
# the advantage favours, but is still penalised for moves in the wrong direction. eps = inf: no clip.
# Value loss (not in the book: PPO's reference implementation), clipped the same way around the rollout's
# values:
#   L^V = 0.5 * E_t[ max((V - R)^2, (clip(V, V_old - vf_clip, V_old + vf_clip) - R)^2) ]
# vf_clip = inf (or None): the plain squared error.
# Total: loss = -L^CLIP + vf_coef * L^V - ent_coef * entropy.
# Every E_t is a masked mean over all valid tokens of the minibatch (each token weighs the same, so long
# replies weigh more than short ones).

def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, resp_mask,
             clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, entropy=None, ent_coef=0.0):
    """All tensors (B, R); logprobs, values (and entropy) carry gradients, the rest are rollout data.
    Returns the scalar loss and a dict of detached 0-dim tensors for logging."""
    m = resp_mask
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)                  # (B, R)
    ratio = torch.exp(log_ratio)                                   # (B, R) r_t(theta), [实战框架 §4.2.2]
    adv = torch.where(m, advantages, 0.0)                                     # (B, R)
    pg_losses = -adv * ratio                                                  # (B, R)
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, R)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), m)    # () -L^CLIP, [实战框架 §4.2.2]

    values = torch.where(m, values, 0.0)                                      # (B, R)
    old_values, returns = torch.where(m, old_values, 0.0), torch.where(m, returns, 0.0)  # (B, R)
    vf_losses = (values - returns) ** 2                                       # (B, R)
    if vf_clip is None:
        vf_loss = 0.5 * masked_mean(vf_losses, m)                             # ()
        value_clipfrac = torch.zeros((), device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)  # (B, R)
        vf_losses_clipped = (values_clipped - returns) ** 2                   # (B, R)
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), m)  # () L^V
        value_clipfrac = masked_mean(((values - old_values).abs() > vf_clip).float(), m)

    if entropy is None:
        if ent_coef != 0.0:
            raise ValueError("ent_coef != 0 needs the entropy (response_logprobs(..., with_entropy=True))")
        entropy_mean = torch.zeros((), device=logprobs.device)
    else:
        entropy_mean = masked_mean(entropy, m)                                # ()
    loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy_mean              # ()

    with torch.no_grad():
        stats = dict(
            pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), entropy=entropy_mean.detach(),
            clipfrac=masked_mean(((ratio - 1.0).abs() > clip_eps).float(), m),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, m),              # k3 of KL(pi_old || pi_theta)
            ratio_mean=masked_mean(ratio, m),
            ratio_max=torch.where(m, ratio, float("-inf")).max(),
            value_clipfrac=value_clipfrac.detach(),
        )
    return loss, stats


def explained_variance(values, returns, mask, total=None):
    """1 - Var[R - V] / Var[R] over valid tokens (`total` as in masked_mean): 1 = the critic predicts the
    returns perfectly, 0 = no better than a constant, < 0 = worse. nan when the returns do not vary."""
    var_returns = masked_var(returns, mask, total=total)                      # () over the whole batch
    ev = 1.0 - masked_var(returns - values, mask, total=total) / var_returns  # ()
    return torch.where(var_returns > 0, ev, float("nan"))


# ====================================================================================================
# Fast paths. Each computes exactly what the plain form beside it computes (tests/test_ppo.py checks), in
# less memory or time.

# ----------------------------------------------------------------------------------------------------
# Log-probs without the (N, V) logits. The plain form, log_softmax(h W^T / T).gather(tokens), holds the
# (N, V) logits, their log-softmax and its gradient at once: (64*128) rows x 8192 tokens x 4 bytes = 268 MB
# each (1.6 GB with GPT-2's full 50,257). logprobs_from_hidden goes through the rows chunk_size at a time,
# in the forward pass and again in the backward pass, where each chunk's logits are recomputed instead of
# stored (what torch.utils.checkpoint would do, written out here with the gradient by hand). So at any time
# only one chunk's (chunk_size, V) tensors are alive.
#
# The gradient, with z = h W^T / temperature the logits and pi = softmax(z):
#   d log pi(a) / dz = onehot(a) - pi        (raise the sampled token, lower every token by its probability)
#   d H / dz         = -pi * (log pi + H)    (H = -sum pi log pi, the entropy)
#   dL/dh = (dL/dz) W / temperature,   dL/dW = (dL/dz)^T h / temperature

def _chunk_log_softmax(h, weight, temperature):
    """h (n, d) -> log pi (n, V), in float32 even under autocast (bf16 logits make the ratios noisy)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = h.float() @ weight.float().t()                               # (n, V)
        if temperature != 1.0:
            logits /= temperature                                             # in place: no second (n, V)
        return F.log_softmax(logits, dim=-1)                                  # (n, V)


def _rowwise_dot(a, b):
    """(n, V), (n, V) -> (n,): sum_v a[i, v] * b[i, v] as a batched matrix product (no (n, V) product)."""
    return torch.einsum("nv,nv->n", a, b)


def _chunks(N, chunk_size):
    return [slice(i, i + chunk_size) for i in range(0, N, chunk_size)]


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, chunk_size, with_entropy):  # h (N, d), tokens (N,)
        ctx.save_for_backward(h, weight, tokens)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        logp = torch.zeros(h.size(0), device=h.device)                        # (N,) float32
        entropy = torch.zeros(h.size(0), device=h.device)                     # (N,) float32 (0 if not asked)
        for c in _chunks(h.size(0), chunk_size):
            logp_all = _chunk_log_softmax(h[c], weight, temperature)          # (n, V)
            logp[c] = logp_all.gather(1, tokens[c, None]).squeeze(1)          # (n,) log pi(token)
            if with_entropy:
                entropy[c] = -_rowwise_dot(logp_all.exp(), logp_all)          # (n,) -sum_a pi(a) log pi(a)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):                               # (N,), (N,)
        h, weight, tokens = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros(h.shape, device=h.device) if need_h else None     # (N, d) float32
        grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None  # (V, d) float32
        for c in _chunks(h.size(0), ctx.chunk_size):
            logp_all = _chunk_log_softmax(h[c], weight, ctx.temperature)      # (n, V) recomputed
            p = logp_all.exp()                                                # (n, V) pi
            g = grad_logp[c, None]                                            # (n, 1)
            # dL/dz = -pi * (g + g_H * (log pi + H)) + onehot(a) * g, with g = dL/dlog pi(a), g_H = dL/dH.
            # Built in place in the memory of log pi (or of pi): two (n, V) tensors alive, not five.
            if ctx.with_entropy:
                H = -_rowwise_dot(p, logp_all)[:, None]                       # (n, 1)
                grad_z = logp_all.add_(H).mul_(grad_entropy[c, None]).add_(g).mul_(p).neg_()  # (n, V)
            else:
                grad_z = p.mul_(-g)                                           # (n, V) -pi * g
            del logp_all, p                                                   # only grad_z's memory remains
            grad_z.scatter_add_(1, tokens[c, None], g)                        # (n, V) + onehot(a) * g
            if ctx.temperature != 1.0:
                grad_z /= ctx.temperature                                     # (n, V) dL/d(h W^T)
            with torch.autocast(device_type=h.device.type, enabled=False):
                if need_h:
                    grad_h[c] = grad_z @ weight.float()                       # (n, d)
                if need_w:
                    grad_w.addmm_(grad_z.t(), h[c].float())                   # (V, d) += grad_z^T h
        grad_h = grad_h.to(h.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def logprobs_from_hidden(hidden, weight, tokens, temperature=1.0, chunk_size=1024, with_entropy=False):
    """log softmax(hidden @ weight^T / temperature)[tokens], without ever holding all (N, V) log-probs.

    hidden (..., d), weight (V, d) (the tied lm_head), tokens (...) long. Returns logprobs (...) float32,
    and with with_entropy=True also the entropy (...) of the tempered distribution at each position.
    Differentiable with respect to hidden and weight (the PPO update backpropagates through it)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} do not line up")
    h = hidden.reshape(-1, hidden.size(-1))                                   # (N, d)
    logp, entropy = _ChunkedLogprobs.apply(h, weight, tokens.reshape(-1), temperature, chunk_size,
                                           with_entropy)                      # (N,), (N,)
    if not with_entropy:
        return logp.view(tokens.shape)                                        # (...)
    return logp.view(tokens.shape), entropy.view(tokens.shape)                # (...), (...)


# ----------------------------------------------------------------------------------------------------
# The discounted sum of GAE, A_t = sum_{s >= t} c^(s - t) delta_s for every t. The plain form is a loop
# backwards over t, A_t = delta_t + c * A_{t+1}. The fast form computes the sum as it is written, for all t
# at once: with the (R, R) matrix D[t, s] = c^(s - t) for s >= t (0 below the diagonal), A = deltas @ D^T.
# One matrix multiply instead of R small steps: no Python loop, so torch.compile makes one graph for every
# R (a loop would be unrolled R times and recompiled for each new R), and the GPU gets one large kernel
# instead of R tiny launches. The O(R^2) product is small (B = 512, R = 1,024: ~1 GFLOP).

def discounted_cumsum_loop(x, c):
    """The plain form: out_t = x_t + c * out_{t+1}, backwards over the last dimension of x (B, R)."""
    out, running = torch.zeros_like(x), torch.zeros_like(x[:, 0])
    for t in reversed(range(x.size(1))):
        running = x[:, t] + c * running                                       # (B,)
        out[:, t] = running
    return out


def discounted_cumsum(x, c):
    """out_t = sum_{s >= t} c^(s - t) x_s for x (B, R), one matrix product: equals discounted_cumsum_loop."""
    t = torch.arange(x.size(1), device=x.device)                              # (R,)
    lag = t[None, :] - t[:, None]                                             # (R, R) lag[t, s] = s - t
    discount = torch.where(lag >= 0, c ** lag.clamp(min=0).to(x.dtype), 0.0)  # (R, R) D[t, s]
    return x @ discount.T                                                     # (B, R)


# ----------------------------------------------------------------------------------------------------
# Fused kernels. Eager PyTorch runs gae and ppo_loss as a chain of small elementwise ops, each one a kernel
# launch and a round trip through memory. torch.compile traces a function once and generates fused kernels
# (Triton on CUDA, C++/OpenMP loops on a CPU) that read each input once. dynamic=True: one graph serves every
# batch size and response length R (a PPO run's R changes with every rollout), instead of a recompile each.

@functools.cache
def fused(fn):
    """fn (gae or ppo_loss) compiled by torch.compile: same arguments, same results (train_ppo --compile)."""
    return torch.compile(fn, dynamic=True)
