"""The book's errors that concern code or arithmetic (README "Errata"), each shown failing in its wrong form and
working in its right one. (The relu loss of [实战框架 §5.2.2] is tested in test_reward.py beside the loss it
breaks.) The listings are re-typed here in miniature, with the same mistake, not copied."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppo import discounted_cumsum_loop, gae


def toy_policy(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3)                                     # logits of 3 actions from a 4-d state


# ---- [实战框架 §5.3.3]: REINFORCE with a per-sample loss tensor, and no zero_grad --------------------------------

def test_reinforce_listing_backpropagates_a_tensor_and_never_zeroes_gradients():
    policy = toy_policy()
    states, actions, rewards = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0]), torch.randn(5)
    log_probs = F.log_softmax(policy(states), -1).gather(1, actions[:, None]).squeeze(1)    # (5,)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        (-log_probs * rewards).backward()                      # the wrong form: a (5,) loss
    # the right form: a scalar (the mean), and zero_grad before each backward
    def step_grad(zero):
        if zero:
            policy.zero_grad()
        lp = F.log_softmax(policy(states), -1).gather(1, actions[:, None]).squeeze(1)
        (-(lp * rewards).mean()).backward()
        return policy.weight.grad.clone()
    policy.zero_grad()
    g1 = step_grad(zero=True)
    g2 = step_grad(zero=False)                                 # without zero_grad: the old gradient is still in
    assert torch.allclose(g2, 2 * g1)
    assert torch.allclose(step_grad(zero=True), g1)


# ---- [实战框架 §5.2.3]: the reward model's loop without zero_grad -----------------------------------------------

def test_reward_model_loop_without_zero_grad_steps_on_the_sum_of_all_batches():
    torch.manual_seed(0)
    head = nn.Linear(4, 1)
    batches = [(torch.randn(3, 4), torch.randn(3, 4)) for _ in range(3)]
    for zero in (False, True):
        head.zero_grad()
        grads = []
        for chosen, rejected in batches:
            if zero:
                head.zero_grad()
            (-F.logsigmoid(head(chosen) - head(rejected)).mean()).backward()
            grads.append(head.weight.grad.clone())
        if zero:
            fresh = grads
        else:
            stale = grads
    assert torch.allclose(stale[2], fresh[0] + fresh[1] + fresh[2], atol=1e-6)   # what the listing steps on
    assert not torch.allclose(stale[2], fresh[2])


# ---- [强化对齐 §5.1.3]: the actor-critic loop: a detached value, and the log of the whole distribution ------------

def test_actor_critic_listing_value_loss_has_no_gradient_and_the_policy_loss_ignores_the_action():
    torch.manual_seed(0)
    actor, critic = nn.Linear(4, 3), nn.Linear(4, 1)
    state, reward = torch.randn(2, 4), torch.tensor([[1.0], [0.5]])
    probs, value = F.softmax(actor(state), -1), critic(state)
    advantage = reward - value.detach()                        # the listing's advantage
    with pytest.raises(RuntimeError, match="does not require grad"):
        advantage.pow(2).mean().backward()                     # its value loss: nothing reaches the critic
    # its policy loss: the log of the whole distribution, the same whatever action was taken
    loss_a = (-torch.log(probs) * advantage).mean()
    g_whole = torch.autograd.grad(loss_a, actor.weight, retain_graph=True)[0]
    for action in (0, 1, 2):                                   # the right form: log pi(the sampled action)
        chosen = torch.log(probs.gather(1, torch.full((2, 1), action)))
        g = torch.autograd.grad((-chosen * advantage).mean(), actor.weight, retain_graph=True)[0]
        assert not torch.allclose(g, g_whole)
    # minimising -A * sum_a log pi(a) with A > 0 pushes pi toward uniform, whatever was rewarded
    pi = torch.tensor([0.7, 0.2, 0.1], requires_grad=True)
    logits = torch.log(pi).detach().requires_grad_()
    (-torch.log(F.softmax(logits, -1)).sum()).backward()
    assert logits.grad[0] > 0 > logits.grad[2]                 # the likely action is pushed down, the rare up
    # and the value loss with gradient: (reward - value)^2 reaches the critic
    (reward - critic(state)).pow(2).mean().backward()
    assert critic.weight.grad.abs().sum() > 0


# ---- [难点和问题 §4.5]: the Q-learning worked example -----------------------------------------------------------------

MOVES = {(1, "U"): 2, (1, "D"): 1, (2, "U"): 1, (2, "D"): 3, (3, "U"): 2, (3, "D"): 3}   # the example's moves


def test_q_learning_example_done_right():
    alpha, gamma = 0.1, 0.9
    Q = {sa: 0.0 for sa in MOVES}
    new = {}
    for (s, a), s2 in MOVES.items():                            # one sweep from Q = 0 (synchronous)
        r = 1.0 if s2 == 3 else 0.0
        new[(s, a)] = Q[(s, a)] + alpha * (r + gamma * max(Q[(s2, b)] for b in "UD") - Q[(s, a)])
    assert new[(2, "D")] == pytest.approx(0.1) and new[(3, "D")] == pytest.approx(0.1)   # the book prints 0.9
    assert new[(1, "U")] == new[(1, "D")] == 0.0               # a tie at s = 1: no reason yet to prefer D
    Q = {sa: 0.0 for sa in MOVES}                               # value iteration to the fixed point
    for _ in range(500):
        Q = {(s, a): (1.0 if s2 == 3 else 0.0) + gamma * max(Q[(s2, b)] for b in "UD") for (s, a), s2 in MOVES.items()}
    assert Q[(1, "U")] == pytest.approx(9.0) and Q[(1, "D")] == pytest.approx(8.1)    # U is optimal at s = 1
    assert Q[(2, "D")] == pytest.approx(10.0) and Q[(3, "D")] == pytest.approx(10.0)


# ---- [实战框架 §4.2.3]: the last exponent of GAE ------------------------------------------------------------------------

def test_gae_last_exponent_is_T_minus_t_minus_1():
    torch.manual_seed(0)
    T, gamma, lam = 6, 0.9, 0.8
    mask = torch.ones(1, T, dtype=torch.bool)
    rewards, values = torch.randn(1, T, dtype=torch.float64), torch.randn(1, T, dtype=torch.float64)
    adv, _ = gae(rewards, values, mask, gamma, lam)
    v_next = torch.cat([values[0, 1:], torch.zeros(1, dtype=torch.float64)])
    delta = rewards[0] + gamma * v_next - values[0]             # (T,) delta_t

    def book(t, last_exponent):                                 # delta_t + ... + (g l)^{last} delta_{T-1}
        terms = [(gamma * lam) ** l * delta[t + l] for l in range(T - 1 - t)]
        return sum(terms) + (gamma * lam) ** last_exponent * delta[T - 1]
    for t in range(T - 1):
        assert book(t, T - t - 1).item() == pytest.approx(adv[0, t].item())          # right: T - t - 1
        assert book(t, T - t + 1).item() != pytest.approx(adv[0, t].item())          # as printed: T - t + 1
    assert torch.allclose(adv, discounted_cumsum_loop(delta[None], gamma * lam))
