"""Tests for ppo.py: every formula against hand-worked numbers or a plain Python loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from ppo import (AdaptiveKLController, FixedKLController, apply_no_eos_penalty, discounted_cumsum,
                 discounted_cumsum_loop, explained_variance, fused, gae, kl_k1, kl_k3, logprobs_from_hidden,
                 logprobs_plain, masked_mean, masked_var, per_token_rewards, ppo_loss, response_logprobs,
                 response_values, whiten)


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    """Like torch.testing.assert_close (whose first call costs seconds of imports), for plain tensors."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach(), expected.detach().to(actual.dtype)
    ok = torch.isclose(actual, expected, rtol=rtol, atol=atol)
    diff = (actual - expected).abs().max().item()
    assert ok.all(), f"max |difference| {diff:g}\nactual:\n{actual}\nexpected:\n{expected}"


def prefix_mask(lengths, R):
    return torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]         # (B, R) bool


def garbage_like(x, mask, value=1e6):
    """x with every masked position replaced by large alternating-sign numbers."""
    junk = value * torch.where(torch.rand(x.shape, dtype=torch.float64) < 0.5, -1.0, 1.0).to(x.dtype)
    return torch.where(mask, x, junk)


# ---------------------------------------------------------------------------------------------- GAE

def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain Python double loop, the book's formula term by term."""
    B, R = rewards.shape
    adv, ret = torch.zeros(B, R, dtype=torch.float64), torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        T_b = lengths[b]
        V = [values[b, t].item() for t in range(T_b)] + [0.0]                 # V(s_{T_b}) = 0: episode over
        delta = [rewards[b, t].item() + gamma * V[t + 1] - V[t] for t in range(T_b)]
        for t in range(T_b):
            a = 0.0
            for l in range(T_b - t):                                          # l = 0 .. T_b - t - 1
                a += (gamma * lam) ** l * delta[t + l]
            adv[b, t] = a
            ret[b, t] = a + V[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_double_loop_on_ragged_rows(gamma, lam):
    torch.manual_seed(0)
    lengths, R = [1, 3, 7, 0], 7
    mask = prefix_mask(lengths, R)
    rewards = torch.randn(4, R, dtype=torch.float64)
    values = torch.randn(4, R, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv_ref, ret_ref = gae_reference(rewards, values, lengths, gamma, lam)
    assert_close(adv, adv_ref)
    assert_close(ret, ret_ref)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert (adv[3] == 0).all()                                                # an empty row stays empty


def test_gae_hand_worked_three_tokens():
    # rewards (0, 0, 1), values (0.5, 0.6, 0.7), V after the last token = 0.
    # gamma = 1, lambda = 0.5:
    #   delta_2 = 1 + 0 - 0.7 = 0.3     A_2 = 0.3
    #   delta_1 = 0 + 0.7 - 0.6 = 0.1   A_1 = 0.1 + 0.5 * 0.3  = 0.25
    #   delta_0 = 0 + 0.6 - 0.5 = 0.1   A_0 = 0.1 + 0.5 * 0.25 = 0.225
    #   returns = A + V = (0.725, 0.85, 1.0)
    # gamma = 0.9, lambda = 0.5 (gamma * lambda = 0.45):
    #   delta_2 = 1 - 0.7 = 0.3                  A_2 = 0.3
    #   delta_1 = 0.9 * 0.7 - 0.6 = 0.03         A_1 = 0.03 + 0.45 * 0.3   = 0.165
    #   delta_0 = 0.9 * 0.6 - 0.5 = 0.04         A_0 = 0.04 + 0.45 * 0.165 = 0.11425
    # The row is padded to R = 5 with garbage that must not matter.
    mask = prefix_mask([3], 5)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 55.0, -3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9e5, 7.0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(adv, torch.tensor([[0.225, 0.25, 0.3, 0, 0]], dtype=torch.float64))
    assert_close(ret, torch.tensor([[0.725, 0.85, 1.0, 0, 0]], dtype=torch.float64))
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3, 0, 0]], dtype=torch.float64))
    assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0, 0, 0]], dtype=torch.float64))


def test_gae_lambda_one_gives_discounted_return_minus_value():
    # With lambda = 1 GAE telescopes to the Monte-Carlo return: A_t = sum_l gamma^l r_{t+l} - V(s_t).
    torch.manual_seed(1)
    mask = prefix_mask([4, 6], 6)
    rewards, values = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    for b, T_b in enumerate([4, 6]):
        for t in range(T_b):
            G = sum(0.9 ** l * rewards[b, t + l].item() for l in range(T_b - t))
            assert ret[b, t].item() == pytest.approx(G)
            assert adv[b, t].item() == pytest.approx(G - values[b, t].item())


def test_discounted_cumsum_matrix_form_equals_the_loop():
    torch.manual_seed(2)
    x = torch.randn(5, 9, dtype=torch.float64)
    for c in (0.0, 0.45, 0.95, 1.0):
        assert_close(discounted_cumsum(x, c), discounted_cumsum_loop(x, c), atol=1e-12)
    assert_close(discounted_cumsum_loop(torch.tensor([[1.0, 2.0, 4.0]]), 0.5), torch.tensor([[3.0, 4.0, 4.0]]))


def test_lambda_zero_is_the_one_step_actor_critic_advantage():
    # [强化对齐 §4.3.2]: A(s_t, a_t) = r_t + gamma V(s_{t+1}) - V(s_t), the TD error: GAE with lambda = 0
    torch.manual_seed(3)
    mask = prefix_mask([4, 6], 6)
    rewards, values = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for b, T_b in enumerate([4, 6]):
        for t in range(T_b):
            v_next = values[b, t + 1].item() if t + 1 < T_b else 0.0
            assert adv[b, t].item() == pytest.approx(rewards[b, t].item() + 0.9 * v_next - values[b, t].item())
            assert ret[b, t].item() == pytest.approx(rewards[b, t].item() + 0.9 * v_next)   # the TD target


def test_ppo_at_ratio_one_is_reinforce_with_a_baseline():
    # [强化对齐 §4.2.3] / [流程与实践 §4.1]: the policy-gradient step is grad of mean_t(-A_t log pi(a_t|s_t)).
    # On the first step after a rollout (ppo_epochs 1, one minibatch: every step is such a step) the new
    # policy IS the old one, the ratio is 1, no clip can act, and PPO's surrogate has exactly this
    # gradient, for any clip_eps. With lam = 1, A_t = return - V(s_t): REINFORCE with the critic as baseline.
    torch.manual_seed(4)
    mask = prefix_mask([3, 5], 5)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    logits = torch.randn(2, 5, 7, requires_grad=True)                       # a toy policy's logits
    tokens = torch.randint(0, 7, (2, 5))
    logp = F.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)   # (2, 5)
    grads = []
    for clip_eps in (0.2, 0.01, float("inf")):
        loss, stats = ppo_loss(logp, logp.detach(), adv, values, values, ret, mask, clip_eps=clip_eps, vf_coef=0.0)
        grads.append(torch.autograd.grad(loss, logits, retain_graph=True)[0])
        assert stats["clipfrac"].item() == 0.0 and stats["ratio_mean"].item() == pytest.approx(1.0)
    reinforce = masked_mean(-adv * logp, mask)                                # the REINFORCE surrogate
    g_reinforce = torch.autograd.grad(reinforce, logits)[0]
    for g in grads:
        assert_close(g, g_reinforce, atol=1e-6)
    G = torch.flip(torch.cumsum(torch.flip(torch.where(mask, rewards, 0.0), [1]), 1), [1])   # returns-to-go
    assert_close(adv, torch.where(mask, G - values, 0.0), atol=1e-5)


def graphs_compiled():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_fused_gae_matches_eager_with_one_graph_for_every_length():
    # torch.compile(gae, dynamic=True), what train_ppo --compile runs (here with the CPU's C++ backend): the
    # same numbers as eager gae, and a new response length R does not compile a new graph (R changes with
    # every rollout; a loop over t would be unrolled and recompiled for each R).
    torch.manual_seed(3)
    compiled, before = fused(gae), graphs_compiled()
    for R in (6, 11, 3, 24):
        lengths = torch.randint(0, R + 1, (5,)).tolist()
        mask = prefix_mask(lengths, R)
        rewards, values = torch.randn(5, R), torch.randn(5, R)
        adv, ret = compiled(rewards, values, mask, 0.99, 0.9)
        adv_ref, ret_ref = gae_reference(rewards.double(), values.double(), lengths, 0.99, 0.9)
        assert_close(adv, adv_ref)
        assert_close(ret, ret_ref)
    assert graphs_compiled() - before <= 1


def test_fused_ppo_loss_matches_eager_loss_and_gradients():
    torch.manual_seed(4)
    compiled, before = fused(ppo_loss), graphs_compiled()
    for R in (7, 13):
        mask = prefix_mask([R, 1, R // 2], R)
        old_logprobs, advantages, old_values, returns = (torch.randn(3, R) for _ in range(4))
        results = []
        for fn in (compiled, ppo_loss):
            logprobs = (old_logprobs + 0.3 * torch.randn(3, R, generator=torch.Generator().manual_seed(R))).requires_grad_()
            values = (old_values + 0.1).requires_grad_()
            entropy = torch.full((3, R), 2.0, requires_grad=True)
            loss, stats = fn(logprobs, old_logprobs, advantages, values, old_values, returns, mask,
                             clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, entropy=entropy, ent_coef=0.01)
            loss.backward()
            results.append((loss, stats, logprobs.grad, values.grad, entropy.grad))
        (loss_c, stats_c, *grads_c), (loss_e, stats_e, *grads_e) = results
        assert_close(loss_c, loss_e)
        for k in stats_e:
            assert_close(stats_c[k], stats_e[k])
        for g_c, g_e in zip(grads_c, grads_e):
            assert_close(g_c, g_e)
    assert graphs_compiled() - before <= 2                                    # the loss (+ its backward graph)


# ---------------------------------------------------------------------------------------------- rewards

def test_per_token_rewards_score_at_last_valid_token():
    mask = prefix_mask([3, 1, 4], 4)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0],
                             [-0.2, 0.0, 0.0, 0.0],
                             [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0],
                        [-0.7, 0.0, 0.0, 0.0],
                        [-2.0, -0.5, -1.0, -3.0]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    beta = 0.1
    rewards, kl = per_token_rewards(scores, logprobs, ref, mask, beta)
    # k1 = logp - ref:   row0 (0.5, -1.0, 0.0), row1 (0.5), row2 (1.0, -0.5, 0.0, 2.0)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0],
                                [0.5, 0.0, 0.0, 0.0],
                                [1.0, -0.5, 0.0, 2.0]])
    # r = -0.1 * k1, plus the score on the last valid token
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0, 0.0],
                             [-0.05 - 1.0, 0.0, 0.0, 0.0],
                             [-0.1, 0.05, 0.0, -0.2 + 0.5]])
    assert_close(kl, expected_kl)
    assert_close(rewards, expected)
    # summed over a reply: score - beta * (sequence k1 KL)
    assert_close(rewards.sum(1), scores - beta * expected_kl.sum(1))


def test_no_eos_penalty_replaces_score():
    scores = torch.tensor([2.0, -0.3, 0.7])
    ended = torch.tensor([True, False, False])
    assert_close(apply_no_eos_penalty(scores, ended, -1.0), torch.tensor([2.0, -1.0, -1.0]))
    assert_close(apply_no_eos_penalty(scores, ended, None), scores)   # switched off


# ---------------------------------------------------------------------------------------------- KL

def test_kl_estimators_are_unbiased_by_exact_enumeration():
    torch.manual_seed(2)
    for _ in range(5):
        logp = F.log_softmax(torch.randn(7, dtype=torch.float64) * 2, dim=0)      # pi over 7 tokens
        ref = F.log_softmax(torch.randn(7, dtype=torch.float64) * 2, dim=0)       # pi_ref
        exact = (logp.exp() * (logp - ref)).sum()                                  # KL(pi || pi_ref)
        w = logp.exp()                                                             # a ~ pi
        assert (w * kl_k1(logp, ref)).sum().item() == pytest.approx(exact.item(), rel=1e-9)
        assert (w * kl_k3(logp, ref)).sum().item() == pytest.approx(exact.item(), rel=1e-9)
        assert exact.item() > 0.01                                                 # a non-trivial case


def test_k3_nonnegative_k1_can_be_negative():
    logp = torch.linspace(-8, 0, 50)[:, None].expand(50, 50)
    ref = torch.linspace(-8, 0, 50)[None, :].expand(50, 50)
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()
    assert (kl_k3(logp, logp) == 0).all()


def test_adaptive_kl_controller_hand_numbers():
    # target 6, horizon 10000, n_steps 1000: beta *= 1 + e * 0.1
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(6.6, 1000) == pytest.approx(0.1 * 1.01)                  # e = 0.1: above target, grows
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(7.2, 1000) == pytest.approx(0.102)                       # e = 0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(60.0, 1000) == pytest.approx(0.102)                      # e = 9 clipped to 0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(torch.tensor(3.0), 1000) == pytest.approx(0.098)         # e = -0.5 clipped to -0.2
    assert c.value == pytest.approx(0.098)
    assert c.update(0.0, 1000) == pytest.approx(0.098 * 0.98)                # compounds
    f = FixedKLController(0.05)
    assert f.update(100.0, 1000) == 0.05 and f.value == 0.05


# ---------------------------------------------------------------------------------------------- losses

def test_clipped_surrogate_hand_worked():
    # eps = 0.2; per token: max(-A r, -A clip(r, 0.8, 1.2))
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2   (clipped: no gain beyond 1.2)
    #   A=-1 r=0.5: max( 0.5,  0.8) =  0.8   (clipped)
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5   (pessimistic: the unclipped, worse term)
    #   A=-1 r=1.5: max( 1.5,  1.2) =  1.5   (unclipped)
    #   A=+2 r=1.1: max(-2.2, -2.2) = -2.2   (inside the trust region)
    # mean = (-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5 = -0.32; |r - 1| > 0.2 on 4 of 5 tokens.
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 50.0]], dtype=torch.float64)
    mask = prefix_mask([5], 6)
    old = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -1.5, -9.0]], dtype=torch.float64)
    logprobs = (old + ratio.log()).requires_grad_()
    zeros = torch.zeros_like(A)
    loss, stats = ppo_loss(logprobs, old, A, zeros, zeros, zeros, mask, clip_eps=0.2, vf_coef=0.0)
    assert stats["pg_loss"].item() == pytest.approx(-0.32)
    assert loss.item() == pytest.approx(-0.32)
    assert stats["clipfrac"].item() == pytest.approx(0.8)
    assert stats["ratio_max"].item() == pytest.approx(1.5)                   # the masked 3.0 is ignored
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5)
    loss.backward()
    # d/dlogp of -A r / N is -A r / 5 where the unclipped term is active, 0 where the clip is active
    assert_close(logprobs.grad,
                               torch.tensor([[0.0, 0.0, -0.1, 0.3, -0.44, 0.0]], dtype=torch.float64))


def test_ratio_one_gives_minus_mean_advantage_and_zero_kl():
    torch.manual_seed(3)
    mask = prefix_mask([2, 5, 4], 5)
    logprobs = -torch.rand(3, 5)
    A = torch.randn(3, 5)
    zeros = torch.zeros_like(A)
    loss, stats = ppo_loss(logprobs, logprobs.clone(), A, zeros, zeros, zeros, mask)
    assert stats["pg_loss"].item() == pytest.approx(-A[mask].mean().item(), abs=1e-6)
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_approx_kl_is_k3_between_old_and_new_policy():
    logprobs = torch.tensor([[math.log(2.0), math.log(0.5)]])
    old = torch.zeros(1, 2)
    zeros = torch.zeros(1, 2)
    _, stats = ppo_loss(logprobs, old, zeros, zeros, zeros, zeros, torch.ones(1, 2, dtype=torch.bool))
    # (r - 1) - log r:  r = 2 -> 1 - ln 2;  r = 0.5 -> -0.5 + ln 2;  mean = 0.25
    assert stats["approx_kl"].item() == pytest.approx(0.25)


def test_value_clipping_hand_worked():
    # vf_clip = 0.2
    #   V_old=1, V=1.5, R=2: unclipped (1.5-2)^2 = 0.25, clipped V=1.2: (1.2-2)^2 = 0.64 -> 0.64
    #   V_old=1, V=1.5, R=1: unclipped 0.25, clipped (1.2-1)^2 = 0.04                   -> 0.25
    #   V_old=0, V=0,   R=1: both 1                                                      -> 1.0
    # vf_loss = 0.5 * (0.64 + 0.25 + 1.0) / 3 = 0.315; |V - V_old| > 0.2 on 2 of 3 tokens.
    values = torch.tensor([[1.5, 1.5, 0.0, -40.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0, 3.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 1.0, 99.0]], dtype=torch.float64)
    mask = prefix_mask([3], 4)
    zeros = torch.zeros(1, 4, dtype=torch.float64)
    loss, stats = ppo_loss(zeros, zeros, zeros, values, old_values, returns, mask, vf_clip=0.2, vf_coef=0.5)
    assert stats["vf_loss"].item() == pytest.approx(0.315)
    assert loss.item() == pytest.approx(0.5 * 0.315)
    assert stats["value_clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # d/dV = 0.5 * vf_coef * 2 (V - R) / 3 = 0.5 (V - R) / 3 where the unclipped term wins, 0 where the
    # clipped one does (it does not depend on V): token 1: 0.5 * 0.5 / 3, token 2: 0.5 * (-1) / 3
    assert_close(values.grad,
                               torch.tensor([[0.0, 0.25 / 3, -0.5 / 3, 0.0]], dtype=torch.float64))
    _, stats = ppo_loss(zeros, zeros, zeros, values, old_values, returns, mask, vf_clip=None)
    assert stats["vf_loss"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 1.0) / 3)


def test_loss_combines_terms_and_entropy_bonus():
    torch.manual_seed(4)
    mask = prefix_mask([3, 2], 3)
    lp, old, A, V, Vo, R, H = (torch.randn(2, 3) for _ in range(7))
    loss, s = ppo_loss(lp, old, A, V, Vo, R, mask, vf_coef=0.3, entropy=H, ent_coef=0.01)
    assert s["entropy"].item() == pytest.approx(H[mask].mean().item(), abs=1e-6)
    assert loss.item() == pytest.approx((s["pg_loss"] + 0.3 * s["vf_loss"] - 0.01 * s["entropy"]).item(),
                                        abs=1e-6)
    with pytest.raises(ValueError, match="entropy"):
        ppo_loss(lp, old, A, V, Vo, R, mask, ent_coef=0.01)


# ---------------------------------------------------------------------------------------------- masked stats

def test_masked_mean_var_and_whiten_use_valid_tokens_only():
    torch.manual_seed(5)
    mask = prefix_mask([2, 5, 3], 5)
    x = garbage_like(torch.randn(3, 5, dtype=torch.float64) * 3 + 2, mask)
    assert masked_mean(x, mask).item() == pytest.approx(x[mask].mean().item())
    assert_close(masked_mean(x, mask, dim=1),
                               torch.stack([x[b, mask[b]].mean() for b in range(3)]))
    assert masked_var(x, mask).item() == pytest.approx(x[mask].var().item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(x[mask].var(unbiased=False).item())
    w = whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert w[mask].std().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all()
    w = whiten(x, mask, shift_mean=False)
    assert w[mask].mean().item() == pytest.approx(x[mask].mean().item())
    assert w[mask].std().item() == pytest.approx(1.0, abs=1e-6)


def test_explained_variance():
    torch.manual_seed(6)
    mask = prefix_mask([4, 2], 4)
    returns = torch.randn(2, 4, dtype=torch.float64)
    values = garbage_like(returns.clone(), mask)
    assert explained_variance(values, returns, mask).item() == pytest.approx(1.0)     # perfect critic
    const = torch.full_like(returns, returns[mask].mean().item())
    assert explained_variance(const, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    # hand: R = (1, 2, 3), V = (1, 1, 1): Var[R - V] = Var(0, 1, 2) = 1, Var[R] = 1 -> 0
    #       V = (1, 2, 2):                 Var(0, 0, 1) = 1/3            -> 1 - 1/3
    R3 = torch.tensor([[1.0, 2.0, 3.0]])
    m3 = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(torch.tensor([[1.0, 1.0, 1.0]]), R3, m3).item() == pytest.approx(0.0)
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), R3, m3).item() == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(R3, torch.ones(1, 3), m3).item())   # returns do not vary


def test_masked_positions_never_matter():
    """Replace every masked input by huge garbage: every output and gradient is unchanged."""
    torch.manual_seed(7)
    B, R = 3, 6
    mask = prefix_mask([1, 4, 6], R)
    clean = {k: torch.randn(B, R, dtype=torch.float64) for k in
             ["logprobs", "old", "ref", "values", "old_values", "entropy", "rewards"]}
    dirty = {k: garbage_like(v, mask) for k, v in clean.items()}
    scores = torch.randn(B, dtype=torch.float64)

    def run(d):
        rewards, kl = per_token_rewards(scores, d["logprobs"], d["ref"], mask, beta=0.05)
        adv, ret = gae(rewards + d["rewards"], d["old_values"], mask, gamma=0.99, lam=0.9)
        adv_w = whiten(adv, mask)
        lp, v = d["logprobs"].clone().requires_grad_(), d["values"].clone().requires_grad_()
        # returns / advantages get garbage in masked slots too
        loss, stats = ppo_loss(lp, d["old"], garbage_like(adv_w, mask), v, d["old_values"],
                               garbage_like(ret, mask), mask, entropy=d["entropy"], ent_coef=0.01)
        loss.backward()
        ev = explained_variance(d["old_values"], ret, mask)
        return [rewards, kl, adv, ret, adv_w, loss, lp.grad, v.grad, ev, *stats.values()]

    for a, b in zip(run(clean), run(dirty)):
        assert torch.isfinite(b).all()
        assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- log-probs

def naive_logprobs(hidden, weight, tokens, temperature):
    logp_all = F.log_softmax(hidden @ weight.t() / temperature, dim=-1)      # (..., V)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)                 # (...)
    entropy = -(logp_all.exp() * logp_all).sum(-1)                           # (...)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1024])
def test_logprobs_from_hidden_matches_naive_with_grad(chunk_size):
    torch.manual_seed(8)
    h = torch.randn(3, 5, 16, requires_grad=True)                            # N = 15 rows
    W = torch.randn(97, 16, requires_grad=True)
    tok = torch.randint(0, 97, (3, 5))
    for temperature in (1.0, 0.7):
        lp_ref, ent_ref = naive_logprobs(h, W, tok, temperature)
        g, g_ent = torch.randn(3, 5), torch.randn(3, 5)
        # log-probs and entropy, gradient of a mix of both
        lp, ent = logprobs_from_hidden(h, W, tok, temperature, chunk_size=chunk_size, with_entropy=True)
        assert lp.shape == (3, 5) and lp.dtype == torch.float32
        assert_close(lp, lp_ref)
        assert_close(logprobs_plain(h, W, tok, temperature), lp_ref)             # the plain form in ppo.py
        assert_close(ent, ent_ref)
        grads = torch.autograd.grad((lp * g).sum() + (ent * g_ent).sum(), (h, W))
        grads_ref = torch.autograd.grad((lp_ref * g).sum() + (ent_ref * g_ent).sum(), (h, W),
                                        retain_graph=True)
        for a, b in zip(grads, grads_ref):
            assert_close(a, b)
        # log-probs only
        lp = logprobs_from_hidden(h, W, tok, temperature, chunk_size=chunk_size)
        assert_close(lp, lp_ref)
        for a, b in zip(torch.autograd.grad((lp * g).sum(), (h, W)),
                        torch.autograd.grad((lp_ref * g).sum(), (h, W), retain_graph=True)):
            assert_close(a, b)
    # gradient to the hidden states only (a frozen head)
    lp = logprobs_from_hidden(h, W.detach(), tok, 0.7, chunk_size=chunk_size)
    (gh,) = torch.autograd.grad((lp * g).sum(), (h,))
    (gh_ref,) = torch.autograd.grad((lp_ref * g).sum(), (h,))
    assert_close(gh, gh_ref)
    with torch.no_grad():                                                     # inference path
        assert_close(logprobs_from_hidden(h, W, tok, 0.7, chunk_size), lp_ref)


def test_logprobs_from_hidden_never_keeps_all_logits_for_backward():
    """The autograd graph must not hold (N, V) activations: count what it saves."""
    torch.manual_seed(9)
    N, V, d = 64, 500, 8
    h = torch.randn(N, d, requires_grad=True)
    W = torch.randn(V, d, requires_grad=True)
    tok = torch.randint(0, V, (N,))
    saved = {}

    def pack(t):                                                              # note each distinct storage once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def count(fn):                                                            # float32 elements saved by fn
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(saved.values()) // 4, out

    n_naive, _ = count(lambda: naive_logprobs(h, W, tok, 1.0)[0])
    n_chunked, lp = count(lambda: logprobs_from_hidden(h, W, tok, chunk_size=16))
    assert n_naive >= N * V
    assert n_chunked < N * V / 4
    lp.sum().backward()                                                       # and it still backpropagates
    assert h.grad is not None and torch.isfinite(W.grad).all()


def test_logprobs_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), 0.0)


@pytest.mark.parametrize("chunk_size", [None, 5])                            # the plain form, the chunked one
def test_response_logprobs_indexing_with_left_padding(chunk_size):
    torch.manual_seed(10)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    B, P, R = 3, 6, 4
    pad = torch.tensor([2, 0, 5])
    seq = torch.randint(0, 97, (B, P + R))
    for b in range(B):
        seq[b, :pad[b]] = 96                                                  # pad token
    with torch.no_grad():
        lp, ent = response_logprobs(model, seq, pad, R, temperature=0.8, with_entropy=True, chunk_size=chunk_size)
        logits = model(seq, pad=pad) / 0.8                                    # (B, P+R, V)
    logp_all = F.log_softmax(logits, dim=-1)
    for b in range(B):
        for j in range(R):                                                    # token P+j predicted at P-1+j
            assert lp[b, j].item() == pytest.approx(logp_all[b, P - 1 + j, seq[b, P + j]].item(), abs=1e-5)
            p = logp_all[b, P - 1 + j].exp()
            assert ent[b, j].item() == pytest.approx(-(p * logp_all[b, P - 1 + j]).sum().item(), abs=1e-4)
    with torch.no_grad():                                                     # row 0 alone, unpadded
        lp0 = response_logprobs(model, seq[:1, 2:], None, R, temperature=0.8)
    assert_close(lp0, lp[:1], atol=1e-5, rtol=1e-5)
    # the PPO update backpropagates through it into every weight, the tied embedding included
    params = [p for p in model.parameters()]
    lp = response_logprobs(model, seq, pad, R, temperature=0.8, chunk_size=chunk_size)
    grads = torch.autograd.grad(lp.sum(), params)
    logp_all = F.log_softmax(model(seq, pad=pad)[:, P - 1:-1] / 0.8, dim=-1)  # (B, R, V)
    grads_ref = torch.autograd.grad(logp_all.gather(-1, seq[:, P:, None]).sum(), params)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        response_logprobs(model, seq, pad, P + R)                             # no prompt token left


def test_response_values_indexing():
    class Critic(torch.nn.Module):
        def values(self, idx, pad=None):                                      # value = 100 * position + token
            return 100.0 * torch.arange(idx.size(1)).float()[None, :] + idx.float()

    B, P, R = 2, 3, 4
    seq = torch.randint(0, 50, (B, P + R))
    v = response_values(Critic(), seq, torch.zeros(B, dtype=torch.long), R)
    assert v.shape == (B, R)
    for j in range(R):                                                        # state before token P+j: P-1+j
        assert_close(v[:, j], 100.0 * (P - 1 + j) + seq[:, P - 1 + j].float())


def test_the_chunked_form_is_taken_only_above_the_size_rule(monkeypatch):
    import ppo
    calls = []
    chunked = ppo.logprobs_from_hidden
    monkeypatch.setattr(ppo, "logprobs_from_hidden", lambda *a, **k: calls.append(k) or chunked(*a, **k))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()
    seq, pad = torch.randint(0, 97, (2, 9)), torch.tensor([0, 1])
    plain = response_logprobs(model, seq, pad, 4)
    assert calls == []                                                        # 8 x 97 x 4 bytes: plain
    monkeypatch.setattr(ppo, "CHUNKED_ABOVE", 8 * 97 * 4 - 1)
    assert_close(response_logprobs(model, seq, pad, 4), plain) and calls[0]["chunk_size"] == 1024


def test_response_logprobs_with_mask_skips_positions_after_eot():
    # only valid reply tokens go through the vocabulary projection; the others are returned as 0
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()
    seq = torch.randint(0, 97, (3, 9))
    pad = torch.tensor([0, 2, 1])
    R = 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    full, full_h = response_logprobs(model, seq, pad, R, with_entropy=True)
    part, part_h = response_logprobs(model, seq, pad, R, with_entropy=True, resp_mask=mask)
    assert torch.allclose(part[mask], full[mask], atol=1e-6) and torch.allclose(part_h[mask], full_h[mask], atol=1e-5)
    assert (part[~mask] == 0).all() and (part_h[~mask] == 0).all()
