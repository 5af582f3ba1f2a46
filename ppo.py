"""
The maths of PPO for RLHF ([实战框架 §4.2] PPO 算法: [实战框架 §4.2.1] 重要性采样, [实战框架 §4.2.2]
信赖域方法, [实战框架 §4.2.3] 广义优势估计; the road to it: [流程与实践 §4.1] 策略梯度算法, [流程与实践 §4.3]
Actor-Critic算法, [强化对齐 §4.2] 策略梯度定理与REINFORCE算法 and [强化对齐 §4.3]). train_ppo.py imports these
short pure functions; tests/test_ppo.py checks each against hand-worked numbers or a plain loop. In order:
log pi and V(s_t), KL and beta, per-token rewards, GAE ([实战框架 §4.2.3]), masked statistics, the PPO loss
([实战框架 §4.2.1-§4.2.2]); then the fast paths (chunked log-probs, discounted sums as one matrix product,
torch.compile), each equal to a plain form.

The MDP, token by token ([难点和问题 §4.1] 强化学习基本数学模型, [强化对齐 §4.1] 马尔可夫决策过程的数学表示).
One reply is one episode. State s_t: the prompt plus the reply tokens so far. Action a_t: the next token (one
of 8,192 ids). Transition ([强化对齐 §4.1.1]): deterministic, s_{t+1} is s_t with a_t appended; the episode ends
at <|endoftext|> or at the token budget (--max_new_tokens). Reward ([强化对齐 §4.1.2]; the chapter's R_{t+1} is
our r_t): -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) on every reply token, plus the reward model's score
on the last (per_token_rewards). Policy ([强化对齐 §4.1.3]): the language model's softmax over the next token.
V^pi(s_t) = E[sum_k gamma^k r_{t+k}] (--gamma, 1 by default), which the critic V_phi (response_values) learns.

From REINFORCE to PPO. The policy gradient is E[sum_t grad log pi(a_t|s_t) A_t] ([流程与实践 §4.1],
[强化对齐 §4.2.1]); REINFORCE takes the return for A_t, minus a baseline b(s_t) ([强化对齐 §4.2.3]).
ppo_loss has this gradient while the ratio is 1 (ppo_epochs 1, one minibatch): with gae's lam = 1 that is
REINFORCE with the critic as baseline, with lam = 0 the one-step actor-critic ([强化对齐 §4.3.2],
[流程与实践 §4.3]).

Shapes. `seq` (B, P+R): left-padded prompts (`pad` (B,) pad tokens per row), then R response tokens;
`resp_mask` (B, R) True on the reply up to and including the first EOT. Every per-token tensor is (B, R);
masked positions are zeroed with torch.where before any arithmetic (even inf there does no harm).

What it simplifies: one reply per prompt, one reward at its end; the KL penalty is k1 per token (no
full-distribution KL); no value-head normalisation; all averages are masked means over every valid token.
"""
import functools

import torch
import torch.nn.functional as F

CHUNKED_ABOVE = 2 ** 30   # bytes: larger (N, V) logits go chunked (cpu / gpu presets: 50 MB / 0.5 GB)


def _prompt_len(seq, resp_len):
    P = seq.size(1) - resp_len
    if resp_len < 1 or P < 1:
        raise ValueError(f"need at least one prompt and one response token: seq {tuple(seq.shape)}, "
                         f"resp_len {resp_len}")
    return P


# log pi(a_t | s_t) of each sampled token. The pi whose ratios PPO takes ([实战框架 §4.2.1]) IS the tempered
# distribution sampled from: policy, old policy and reference all use the sampling temperature (no top-k /
# top-p), or the ratio would not be 1 before the first update and the KL penalty would be wrong.
def response_logprobs(model, seq, pad, resp_len, temperature=1.0, with_entropy=False, chunk_size=None,
                      resp_mask=None):
    """log pi(response token j | prompt, tokens < j) for every response position: (B, R) [, entropy (B, R)].
    Token P+j is predicted at position P-1+j. Dropout off (model.eval()). With resp_mask (B, R) only valid
    tokens are projected, the rest are 0. chunk_size None: plain up to CHUNKED_ABOVE bytes of logits."""
    P = _prompt_len(seq, resp_len)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    h = model.hidden_states(seq, pad)[:, P - 1:-1]               # (B, R, d) of (B, P+R, d): before the tokens
    tokens = seq[:, P:]                                                       # (B, R)
    resp_mask = torch.ones_like(tokens, dtype=torch.bool) if resp_mask is None else resp_mask  # (B, R)
    W = model.lm_head.weight                                                  # (V, d) tied to the embedding
    if chunk_size is None and int(resp_mask.sum()) * W.size(0) * 4 > CHUNKED_ABOVE:  # bytes of (N, V) logits
        chunk_size = 1024
    logprobs = logprobs_plain if chunk_size is None else functools.partial(logprobs_from_hidden,
                                                                           chunk_size=chunk_size)
    out = logprobs(h[resp_mask], W, tokens[resp_mask], temperature, with_entropy=with_entropy)  # (N_valid,)
    out = out if with_entropy else (out,)
    full = [x.new_zeros(tokens.shape).masked_scatter_(resp_mask, x) for x in out]   # (B, R) 0 after EOT
    return tuple(full) if with_entropy else full[0]


def logprobs_plain(hidden, weight, tokens, temperature=1.0, with_entropy=False):
    """log softmax(hidden @ weight^T / temperature)[tokens], all (N, V) logits at once: hidden (..., d),
    weight (V, d), tokens (...) -> (...) float32 [, the entropy (...) of the tempered distribution]."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):   # float32 under bf16 autocast too
        logits = hidden.float() @ weight.float().t() / temperature           # (..., V)
    logp_all = F.log_softmax(logits, dim=-1)                                  # (..., V)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)                 # (...) the sampled tokens'
    return (logp, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else logp   # H = -sum p log p


def response_values(critic, seq, pad, resp_len):
    """V(s_j), the value of the state just before response token j, (B, R): position P-1+j of critic.values
    (reward.RewardModel). The state after the last token has value 0 by definition (see gae)."""
    P = _prompt_len(seq, resp_len)
    values = critic.values(seq, pad)                                          # (B, P+R)
    return values[:, P - 1:-1]                                                # (B, R)


# KL(pi || pi_ref) = E_{a ~ pi}[log pi(a) - log pi_ref(a)], estimated from the ONE token a that pi sampled
# at each position. With x = pi_ref(a) / pi(a) (J. Schulman, "Approximating KL Divergence", 2020):
#   k1 = -log x                unbiased; a single sample can be negative; high variance
#   k3 = (x - 1) - log x       unbiased (E_pi[x - 1] = 0); always >= 0 (log x <= x - 1); lower variance
# The book has no KL penalty: it comes from Ziegler et al. 2019 and [实战框架 §7.3.1] InstructGPT.
def kl_k1(logprobs, ref_logprobs):
    return logprobs - ref_logprobs                                            # (B, R)


def kl_k3(logprobs, ref_logprobs):
    log_x = ref_logprobs - logprobs                                           # (B, R) log pi_ref/pi
    return torch.expm1(log_x) - log_x                                         # (B, R) >= 0


# The KL coefficient beta, adaptive (Ziegler et al. 2019), after a KL measured over n_steps episodes:
#   e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
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


# The reward PPO maximises, per token t of a reply (InstructGPT's KL-penalised reward; not in the book):
#   r_t = -beta * (log pi(a_t) - log pi_ref(a_t))           on every valid reply token (k1 KL penalty)
#       + score (the reward model's verdict on the reply)   added on the reply's LAST valid token
# Summed over the reply: score - beta * (k1 estimate of the sequence KL(pi || pi_ref)).
def per_token_rewards(scores, logprobs, ref_logprobs, resp_mask, beta):
    """scores (B,), logprobs / ref_logprobs / resp_mask (B, R) -> rewards, kl (k1) (B, R), 0 where masked."""
    kl = torch.where(resp_mask, kl_k1(logprobs, ref_logprobs), 0.0)          # (B, R)
    rewards = -beta * kl                                                      # (B, R)
    n_valid = resp_mask.sum(dim=1)                                            # (B,)
    last = (n_valid - 1).clamp(min=0)                                     # (B,) index of the last valid token
    score = torch.where(n_valid > 0, scores.to(rewards.dtype), 0.0)          # (B,) an empty row gets nothing
    rewards = rewards.scatter_add(1, last[:, None], score[:, None])          # (B, R)
    return rewards, kl


def apply_no_eos_penalty(scores, ended, penalty=None):
    """Replace (not add to) the score of a reply cut off by the token budget (`ended` (B,) False: a text the
    reward model never saw in training) by `penalty`, so the policy learns to finish. None: no change."""
    return scores if penalty is None else torch.where(ended, scores, torch.full_like(scores, penalty))  # (B,)


# [实战框架 §4.2.3] 广义优势估计 (GAE), for each row b with T_b valid tokens:
#   delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     V(s_{T_b}) = 0 (the episode ended with the reply)
#   A_t = sum_{l=0}^{T_b - t - 1} (gamma * lambda)^l * delta_{t+l}
# The book's last term is (gamma lambda)^{T-t+1} delta_{T-1}: a typo (its exponent is T-1-t; see the README's
# errata). As a loop: A_t = delta_t + gamma * lambda * A_{t+1}. The critic's target: R_t = A_t + V(s_t).
# lam = 0: A_t = delta_t, actor-critic's one-step TD advantage ([强化对齐 §4.3.2]); lam = 1: A_t = (the
# discounted sum of the rewards from t) - V(s_t), REINFORCE with a baseline ([强化对齐 §4.2.3]).
def gae(rewards, values, resp_mask, gamma=1.0, lam=0.95, matrix=False):
    """rewards, values (B, R), resp_mask (B, R) bool prefix -> advantages, returns (B, R), 0 where masked.
    The sum is discounted_cumsum_loop; with matrix=True or compiled (fused(gae)), discounted_cumsum."""
    rewards = torch.where(resp_mask, rewards.detach(), 0.0)                  # (B, R) rollout data, no grad
    values = torch.where(resp_mask, values.detach(), 0.0)                    # (B, R) V = 0 after the reply
    next_values = F.pad(values[:, 1:], (0, 1))                               # (B, R) V(s_{t+1}), 0 at the end
    deltas = rewards + gamma * next_values - values                           # (B, R) delta_t, 0 where masked
    cumsum = discounted_cumsum if matrix or torch.compiler.is_compiling() else discounted_cumsum_loop
    advantages = cumsum(deltas, gamma * lam)                    # (B, R) A_t = sum_l (gamma lam)^l delta_{t+l}
    advantages = torch.where(resp_mask, advantages, 0.0)                      # (B, R)
    returns = torch.where(resp_mask, advantages + values, 0.0)                # (B, R)
    return advantages, returns


def masked_mean(x, mask, dim=None, total=None):
    """Mean of x where mask is True (masked entries set to 0 first), over `dim` or all. total: sums over the
    torchrun processes' shares of the batch (train_ppo.py passes data.plumbing.all_sum); None: one process."""
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
    """(x - mean) / std over the valid tokens (`total` as in masked_mean), 0 where masked: the advantages get
    the same scale whatever the reward scale. shift_mean=False only rescales (keeps the mean)."""
    mean = masked_mean(x, mask, total=total)                                  # () over the whole batch
    var = masked_var(x, mask, total=total)                                    # ()
    out = (x - mean) * torch.rsqrt(var + eps)                                 # same shape as x
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


# [实战框架 §4.2.1] 重要性采样: the rollout was sampled by the old policy, the update changes theta:
#   r_t(theta) = pi_theta(a_t | s_t) / pi_old(a_t | s_t) = exp(log pi_theta - log pi_old)
# [实战框架 §4.2.2] 信赖域方法 (PPO's clip, not TRPO's KL constraint), maximised; we minimise its negative:
#   L^CLIP = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]
# The min is pessimistic: nothing is gained by moving r_t beyond 1 +- eps the way the advantage favours, but
# moves the wrong way are still penalised. eps = inf: no clip. Value loss (PPO's reference implementation):
#   L^V = 0.5 * E_t[ max((V - R)^2, (clip(V, V_old - vf_clip, V_old + vf_clip) - R)^2) ]
# vf_clip = inf (or None): plain squared error. loss = -L^CLIP + vf_coef * L^V - ent_coef * entropy, each
# E_t a masked mean over the minibatch's valid tokens (long replies weigh more).
def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, resp_mask,
             clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, entropy=None, ent_coef=0.0):
    """All (B, R); logprobs, values (and entropy) carry gradients, the rest are rollout data. Returns the
    scalar loss and a dict of detached 0-dim tensors for logging."""
    m = resp_mask
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)                  # (B, R)
    ratio = torch.exp(log_ratio)                                   # (B, R) r_t(theta), [实战框架 §4.2.2]
    adv = torch.where(m, advantages, 0.0)                                     # (B, R)
    pg_losses = -adv * ratio                                                  # (B, R)
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, R)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), m)    # () -L^CLIP, [实战框架 §4.2.2]

    values, old_values, returns = (torch.where(m, x, 0.0) for x in (values, old_values, returns))  # (B, R)
    vf_losses = (values - returns) ** 2                                       # (B, R)
    value_clipfrac = torch.zeros((), device=values.device)
    if vf_clip is not None:
        values_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)  # (B, R)
        vf_losses = torch.max(vf_losses, (values_clipped - returns) ** 2)     # (B, R)
        value_clipfrac = masked_mean(((values - old_values).abs() > vf_clip).float(), m)
    vf_loss = 0.5 * masked_mean(vf_losses, m)                                 # () L^V

    if entropy is None and ent_coef != 0.0:
        raise ValueError("ent_coef != 0 needs the entropy (response_logprobs(..., with_entropy=True))")
    entropy_mean = torch.zeros((), device=logprobs.device) if entropy is None else masked_mean(entropy, m)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy_mean              # ()

    with torch.no_grad():
        stats = dict(pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), entropy=entropy_mean.detach(),
                     clipfrac=masked_mean(((ratio - 1.0).abs() > clip_eps).float(), m),
                     approx_kl=masked_mean((ratio - 1.0) - log_ratio, m),   # k3 of KL(pi_old || pi_theta)
                     ratio_mean=masked_mean(ratio, m), ratio_max=torch.where(m, ratio, float("-inf")).max(),
                     value_clipfrac=value_clipfrac.detach())
    return loss, stats


def explained_variance(values, returns, mask, total=None):
    """1 - Var[R - V] / Var[R] over valid tokens (`total` as in masked_mean): 1 = perfect, 0 = no better than
    a constant, < 0 = worse; nan when the returns do not vary."""
    var_returns = masked_var(returns, mask, total=total)                      # () over the whole batch
    ev = 1.0 - masked_var(returns - values, mask, total=total) / var_returns  # ()
    return torch.where(var_returns > 0, ev, float("nan"))


# ==== Fast paths: each equals its plain form (tests/test_ppo.py), in less memory or time ==================
# Log-probs without the (N, V) logits (268 MB each for 64*128 rows x 8192 tokens): chunk_size rows at a
# time, forward and backward, each chunk's logits recomputed in the backward pass instead of stored.
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


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, chunk_size, with_entropy):  # h (N, d), tokens (N,)
        ctx.save_for_backward(h, weight, tokens)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.chunks = [slice(i, i + chunk_size) for i in range(0, h.size(0), chunk_size)]  # rows of each chunk
        logp, entropy = (torch.zeros(h.size(0), device=h.device) for _ in range(2))  # (N,) each
        for c in ctx.chunks:
            logp_all = _chunk_log_softmax(h[c], weight, temperature)          # (n, V)
            logp[c] = logp_all.gather(1, tokens[c, None]).squeeze(1)          # (n,) log pi(token)
            if with_entropy:
                entropy[c] = -torch.einsum("nv,nv->n", logp_all.exp(), logp_all)  # (n,) -sum_a pi log pi
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):                               # (N,), (N,)
        h, weight, tokens = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros(h.shape, device=h.device) if need_h else None     # (N, d) float32
        grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None  # (V, d) float32
        for c in ctx.chunks:
            logp_all = _chunk_log_softmax(h[c], weight, ctx.temperature)      # (n, V) recomputed
            p = logp_all.exp()                                                # (n, V) pi
            g = grad_logp[c, None]                                            # (n, 1)
            # dL/dz = -pi * (g + g_H * (log pi + H)) + onehot(a) * g, with g = dL/dlog pi(a), g_H = dL/dH.
            # Built in place in the memory of log pi (or of pi): two (n, V) tensors alive, not five.
            if ctx.with_entropy:
                H = -torch.einsum("nv,nv->n", p, logp_all)[:, None]           # (n, 1) no (n, V) product
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
        return (grad_h.to(h.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None)


def logprobs_from_hidden(hidden, weight, tokens, temperature=1.0, chunk_size=1024, with_entropy=False):
    """logprobs_plain's result (differentiable in hidden and weight) without ever holding all (N, V) logits:
    hidden (..., d), weight (V, d), tokens (...) -> (...) float32 [, entropy (...)]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} do not line up")
    logp, entropy = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.size(-1)), weight, tokens.reshape(-1),
                                           temperature, chunk_size, with_entropy)  # (N,), (N,) from (N, d)
    logp, entropy = logp.view(tokens.shape), entropy.view(tokens.shape)       # (...), (...)
    return (logp, entropy) if with_entropy else logp


# GAE's discounted sum as A = deltas @ D^T, D[t, s] = c^(s - t) for s >= t (0 below): one graph for every R
# under torch.compile (a loop is unrolled R times), one kernel (B = 512, R = 1,024: ~1 GFLOP).
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


@functools.cache
def fused(fn):
    """fn (gae or ppo_loss) compiled (train_ppo --compile): same results, from fused kernels that read each
    input once; dynamic=True: one graph for every batch size and R (R changes with every rollout)."""
    return torch.compile(fn, dynamic=True)
