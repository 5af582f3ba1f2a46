"""The book's errors that concern code or arithmetic (README "Errata"), each shown failing in its wrong form and
working in its right one. (The relu loss of [实战框架 §5.2.2] is tested in test_reward.py beside the loss it
breaks.) The listings are re-typed here in miniature, with the same mistake, not copied."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.prepare import get_tokenizer
from model import GPT, GPTConfig
from ppo import discounted_cumsum_loop, gae
from reward import RewardModel
from sample import decode_replies, encode_prompt, generate


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
    # the book's own step, Q + α·r + γ·max Q': with max Q(3, ·) read as 1 (all Q are 0) its sum is 1.0, not its
    # printed 0.9; and α on r alone, without −Q, is no update rule at all: swept, it never converges
    assert 0 + alpha * 1 + gamma * 1 == pytest.approx(1.0) and 0 + alpha * 1 + gamma * 1 != pytest.approx(0.9)
    book, right = dict.fromkeys(MOVES, 0.0), dict.fromkeys(MOVES, 0.0)
    for _ in range(20):
        book = {(s, a): book[(s, a)] + alpha * (1.0 if s2 == 3 else 0.0) + gamma * max(book[(s2, b)] for b in "UD")
                for (s, a), s2 in MOVES.items()}
        right = {(s, a): right[(s, a)] + alpha * ((1.0 if s2 == 3 else 0.0) + gamma * max(right[(s2, b)] for b in "UD")
                                                  - right[(s, a)]) for (s, a), s2 in MOVES.items()}
    assert book[(3, "D")] > 1e3 and max(right.values()) < 1 / (1 - gamma)   # Q* is at most 10 here
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


# ---- [实战框架 §5.2.3]: the reward model's loop never reads labels_batch, and has no optimizer of its own ------

def test_reward_model_loop_ignores_labels_batch_and_names_an_undefined_optimizer():
    """The loop unpacks `labels_batch` but always scores lhs - rhs, as if lhs were the preferred reply every
    time; and `optimizer` / `scheduler` are neither defined nor arguments of train_reward(data_loader, model,
    epochs)."""
    def train_reward(data_loader, model, epochs):              # the listing's signature, in miniature
        for _ in range(epochs):
            for lhs, rhs, labels in data_loader:
                (-F.logsigmoid(model(lhs) - model(rhs)).mean()).backward()
                optimizer.step()                               # noqa: F821 (what the listing does)
    torch.manual_seed(0)
    w_true = torch.randn(4)
    a, b = torch.randn(200, 4), torch.randn(200, 4)            # pairs in random order
    labels = (a @ w_true > b @ w_true).float()                 # 1: lhs preferred, 0: rhs preferred
    with pytest.raises(NameError, match="optimizer"):
        train_reward([(a, b, labels)], nn.Linear(4, 1), 1)

    def book_loss(head, labels):                               # labels unpacked, never read
        return -F.logsigmoid(head(a) - head(b)).mean()

    def right_loss(head, labels):                              # the preferred reply first, as the label says
        sign = (2 * labels - 1)[:, None]
        return -F.logsigmoid(sign * (head(a) - head(b))).mean()
    head = nn.Linear(4, 1)
    g = torch.autograd.grad(book_loss(head, labels), head.weight)[0]
    g_flipped = torch.autograd.grad(book_loss(head, 1 - labels), head.weight)[0]
    assert torch.equal(g, g_flipped)                           # every label flipped: the very same step
    accuracy = {}
    for name, loss_fn in (("book", book_loss), ("right", right_loss)):
        torch.manual_seed(1)
        head = nn.Linear(4, 1)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)       # the optimizer, passed in and zeroed
        for _ in range(100):
            opt.zero_grad()
            loss_fn(head, labels).backward()
            opt.step()
        with torch.no_grad():
            accuracy[name] = ((head(a) > head(b)).squeeze(1).float() == labels).float().mean().item()
    assert accuracy["right"] > 0.9 and accuracy["book"] < 0.7  # the book's loop learns no preference at all


# ---- [实战框架 §4.2.1]: ĝ as printed is the importance-sampled surrogate, not a gradient -----------------------

def test_importance_sampling_g_hat_is_the_surrogate_objective_not_its_gradient():
    """ĝ (the PPO paper's symbol for the policy-gradient estimate) is printed as (1/N) Σ p_θ/p_θk · A, with no
    ∇log p: that is the surrogate objective L(θ), one number. Its gradient at θ = θ_k is the policy
    gradient estimate."""
    policy = toy_policy()
    states, actions, adv = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(8)
    with torch.no_grad():
        logp_old = F.log_softmax(policy(states), -1).gather(1, actions[:, None]).squeeze(1)   # p_θk, fixed
    logp = F.log_softmax(policy(states), -1).gather(1, actions[:, None]).squeeze(1)
    g_hat_as_printed = (torch.exp(logp - logp_old) * adv).mean()
    assert g_hat_as_printed.dim() == 0 and policy.weight.dim() == 2     # a scalar, not a (3, 4) gradient
    assert g_hat_as_printed.item() == pytest.approx(adv.mean().item())  # at θ = θ_k: mean(A), for any policy
    grad_of_surrogate = torch.autograd.grad(g_hat_as_printed, policy.weight, retain_graph=True)[0]
    policy_gradient = torch.autograd.grad((logp * adv).mean(), policy.weight)[0]    # (1/N) Σ ∇log p · A
    assert torch.allclose(grad_of_surrogate, policy_gradient, atol=1e-6)
    assert grad_of_surrogate.abs().sum() > 0


# ---- [实战框架 §5.2.1]: forward returns the encoder's output: hidden states, not a score -----------------------

def test_reward_model_returning_the_encoder_output_gives_hidden_states_not_a_score():
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32)

    class Encoder(nn.Module):                                  # what self.encoder(x) hands back: (B, T, d)
        def __init__(self):
            super().__init__()
            self.gpt = GPT(cfg)

        def forward(self, x):
            return self.gpt.hidden_states(x)

    class BookRewardModel(nn.Module):                          # the listing's shape: forward = encoder
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            return self.encoder(x)
    torch.manual_seed(0)
    chosen, rejected = torch.randint(0, 100, (2, 6)), torch.randint(0, 100, (2, 6))
    book = BookRewardModel(Encoder())
    lhs, rhs = book(chosen), book(rejected)
    assert lhs.shape == (2, 6, 32)                             # 192 numbers per reply, not one
    with pytest.raises(ValueError, match="only one element tensors"):
        float(lhs[0].detach())                                 # "the score of reply 0" does not exist
    better = lhs[0] > rhs[0]
    assert better.any() and not better.all()                   # no answer to "which reply is better?"
    # the right form: a Linear(d, 1) head read out over the reply: one score per reply
    rm = RewardModel(cfg).eval()
    mask = torch.ones(2, 6, dtype=torch.bool)
    scores = rm(chosen, mask)
    assert scores.shape == (2,) and isinstance(float(scores[0].detach()), float)


# ---- [实战框架 §5.4.1]: decoding the whole output of generate, and max_length ----------------------------------

def tiny_lm(block_size=64):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size))
    with torch.no_grad():
        m.wte.weight.mul_(10)                                  # spread-out logits: no near-ties under greedy
    return m.eval()


def test_decoding_the_whole_generated_sequence_echoes_the_prompt():
    """`generate` returns the prompt followed by the reply (HF's and ours alike): decoding output[0] whole
    hands the user's own words back as the start of the "reply", which the chat of [实战框架 §5.4.2] prints."""
    enc, m = get_tokenizer(), tiny_lm()
    prompt = encode_prompt(enc, "Tell me a story")
    seq, _, mask = generate(m, [prompt], 8, greedy=True)
    book_reply = enc.decode(seq[0].tolist())                   # the listing: decode(output[0])
    assert book_reply.startswith(enc.decode(prompt)) and "Human: Tell me a story" in book_reply
    reply = decode_replies(enc, seq, mask)[0]                  # the right form: only the generated tokens
    assert "Human:" not in reply and "Tell me a story" not in reply


def test_max_length_counts_the_prompt_so_a_long_prompt_leaves_no_room_for_a_reply():
    """Emulated: Hugging Face's `max_length` bounds prompt + reply (`max_new_tokens` bounds the reply alone).
    The stand-in below passes our generate what is left of max_length after the prompt; recent transformers
    versions refuse (ValueError) a prompt as long as max_length, as ours does a budget under 1."""
    def generate_max_length(model, prompt, max_length):        # the book's knob, with HF's meaning
        return generate(model, [prompt], max_length - len(prompt), greedy=True)
    m = tiny_lm()
    short, long = list(range(100, 105)), list(range(100, 138))     # 5 and 38 prompt tokens
    for prompt in (short, long):
        seq, _, mask = generate_max_length(m, prompt, max_length=40)
        assert seq.size(1) == 40 and mask.size(1) == 40 - len(prompt)   # the reply gets what the prompt left
    _, _, mask_long = generate_max_length(m, long, max_length=40)
    assert mask_long.size(1) == 2                              # 38 tokens of prompt leave 2 for the reply
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_max_length(m, list(range(100, 140)), max_length=40)   # a 40-token prompt: no reply at all
    for prompt in (short, long):                               # the right form: a budget for the reply alone
        seq, _, mask = generate(m, [prompt], 20, greedy=True)
        assert seq.size(1) - mask.size(1) == len(prompt) and mask.size(1) == 20


# ---- [强化对齐 §5.1.3]: no last_hidden_state on an LM's output; a fresh head; the LM never trained; no KL ---

class LMOutput:
    """Emulates what a Hugging Face *LMHeadModel returns: `logits`, and `hidden_states` (a tuple, one per
    layer) only when called with output_hidden_states=True. No `last_hidden_state`: the bare model has it."""
    def __init__(self, logits, hidden_states=None):
        self.logits, self.hidden_states = logits, hidden_states


class LMHeadStandIn(nn.Module):
    """A stand-in for GPT2LMHeadModel: our GPT, its output wrapped as above (one 'layer' of hidden states)."""
    def __init__(self, cfg):
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, input_ids, output_hidden_states=False):
        h = self.gpt.hidden_states(input_ids)                  # (B, T, d)
        return LMOutput(self.gpt.lm_head(h), (h,) if output_hidden_states else None)


def test_lm_head_output_has_no_last_hidden_state_and_the_pretrained_lm_is_never_trained():
    """Emulated: the output object of an LM-head model holds `logits` only, so `.last_hidden_state` raises
    AttributeError. Past that, the listing's PolicyNet is a fresh two-layer head over the whole vocabulary
    (the pretrained LM head is thrown away), and its optimizers hold policy_net's and value_net's parameters
    only: the language model itself is never updated."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)
    lm = LMHeadStandIn(cfg)
    with torch.no_grad():
        lm.gpt.wte.weight.mul_(10)                             # a confident LM, as a pretrained one would be
    ids = torch.randint(0, 50, (2, 5))
    out = lm(ids)
    with pytest.raises(AttributeError, match="last_hidden_state"):
        out.last_hidden_state
    h = lm(ids, output_hidden_states=True).hidden_states[-1][:, -1, :]      # the right way to h
    policy_net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 50), nn.Softmax(-1))   # fresh head
    value_net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))
    lm_probs = F.softmax(out.logits[:, -1, :], -1)             # what the pretrained LM would say next
    fresh = policy_net(h)
    kl = (lm_probs * (lm_probs.log() - fresh.log())).sum(-1)
    assert (kl > 0.5).all()                                    # the fresh head has lost what the LM knew
    assert lm_probs.max(-1).values.min() > 0.1 > fresh.max().item()   # confident LM, near-uniform fresh head
    opts = [torch.optim.Adam(net.parameters(), lr=1e-2) for net in (policy_net, value_net)]   # as listed
    lm_before = [p.detach().clone() for p in lm.parameters()]
    head_before = policy_net[0].weight.detach().clone()
    reward = torch.tensor([[1.0], [0.5]])
    value = value_net(h)
    advantage = reward - value.detach()
    loss = (-torch.log(policy_net(h)) * advantage).mean() + (reward - value).pow(2).mean()
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()
    assert not torch.equal(policy_net[0].weight, head_before)
    assert all(torch.equal(p, q) for p, q in zip(lm.parameters(), lm_before))   # the LM: not one weight moved
    assert lm.gpt.wte.weight.grad is not None                 # its gradient was there; no optimizer used it
    # the right form: the LM's own next-token distribution is the policy, and its parameters are optimised
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    a = torch.multinomial(lm_probs.detach(), 1)                # an action (a token) is sampled ...
    logp = F.log_softmax(lm(ids).logits[:, -1, :], -1).gather(1, a)
    opt.zero_grad()
    (-(logp * advantage).mean()).backward()                   # ... and its log-probability is what is pushed
    opt.step()
    assert not torch.equal(lm.gpt.wte.weight, lm_before[0])


def test_policy_loss_without_a_kl_term_drifts_as_far_from_the_reference_as_the_reward_pulls():
    """The listing's loss has no KL(π || π_ref) term. On a 3-action bandit, exact gradient ascent on E_π[r]
    alone drives π onto the best action (and the KL to the reference up to its maximum); with the penalty β·KL
    the policy settles where the theory says, π* ∝ π_ref · exp(r / β)."""
    r = torch.tensor([1.0, 0.5, 0.0])
    ref_logits = torch.tensor([0.0, 1.0, 0.5])
    ref = F.softmax(ref_logits, -1)

    def train(beta):
        logits = ref_logits.clone().requires_grad_()
        opt = torch.optim.SGD([logits], lr=2.0)
        for _ in range(200):
            pi = F.softmax(logits, -1)
            kl = (pi * (pi.log() - ref.log())).sum()
            opt.zero_grad()
            (-(pi * r).sum() + beta * kl).backward()
            opt.step()
        pi = F.softmax(logits, -1).detach()
        return pi, (pi * (pi.log() - ref.log())).sum().item()
    pi_free, kl_free = train(beta=0.0)
    pi_kl, kl_kl = train(beta=0.5)
    assert pi_free[0] > 0.97 and kl_free > 1.5                 # max KL here: -log ref[0] = 1.84
    target = ref * torch.exp(r / 0.5)
    assert torch.allclose(pi_kl, target / target.sum(), atol=1e-4) and kl_kl < 0.5


# ---- [强化对齐 §5.2.2]: the forward pass runs outside the GradientTape -----------------------------------------

def test_forward_pass_outside_the_recording_context_gives_no_gradient():
    """Emulated: a tf.GradientTape records only what runs inside its `with` block; the listing computes
    subtask_probs and low_probs before entering it, so tape.gradient has no path to the networks' variables
    and returns None for each. The torch analogue: run the forward pass outside recording (under no_grad),
    compute the loss inside (enable_grad): the loss has no graph back to the parameters."""
    torch.manual_seed(0)
    high = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(-1))
    state, extrinsic = torch.randn(2, 4), torch.tensor([[1.0], [0.2]])
    with torch.no_grad():                                      # "outside the tape": nothing recorded
        probs = high(state)
    subtask = torch.multinomial(probs, 1)
    with torch.enable_grad():                                  # "inside the tape": only the loss
        high_loss = (-torch.log(probs.gather(1, subtask)) * extrinsic).mean()
    assert high_loss.grad_fn is None and not high_loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        high_loss.backward()
    assert all(p.grad is None for p in high.parameters())     # what tape.gradient hands apply_gradients: None
    with torch.enable_grad():                                  # the right form: the forward pass inside too
        probs = high(state)
        high_loss = (-torch.log(probs.gather(1, subtask)) * extrinsic).mean()
    high_loss.backward()
    assert all(p.grad is not None for p in high.parameters()) and high[2].weight.grad.abs().sum() > 0


# ---- [强化对齐 §5.3.1]: ' '.join over the context, which holds token tensors -----------------------------------

def test_joining_sampled_token_tensors_into_a_string_raises():
    """The environment appends each action (torch.multinomial's (1, 1) tensor of a token id) to self.context
    and then builds its state from ' '.join(self.context): str.join takes strings only."""
    enc = get_tokenizer()
    context = []
    for token in enc.encode_ordinary(" Hello world"):           # one token per step
        probs = F.one_hot(torch.tensor([token]), enc.n_vocab).float()      # a policy sure of its token
        context.append(torch.multinomial(probs, 1))          # (1, 1) long tensor, as the training loop makes
    with pytest.raises(TypeError, match="expected str instance, Tensor found"):
        " ".join(context)
    ids = torch.cat(context, dim=1)                            # the right form: keep the ids, concatenate ...
    assert ids.shape == (1, len(context)) and enc.decode(ids[0].tolist()) == " Hello world"   # ... or decode


# ---- [难点和问题 §3.4]: fine-tuning after train(False); MLM against LM targets; two steps, one gradient ---

def test_fine_tuning_after_train_false_runs_in_evaluation_mode():
    """model.train(False) is model.eval(): the fine-tuning that follows runs with dropout off and with
    BatchNorm using (and never updating) its running statistics. No error: the regularisation just goes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4) + 3.0, torch.randint(0, 2, (16,))

    def fine_tune_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.train(False)                                         # the listing, before its fine-tuning loop
    assert not model.training
    assert torch.equal(model(x), model(x))                     # dropout is off: two passes agree exactly
    fine_tune_step()
    assert torch.equal(model[1].running_mean, torch.zeros(8))  # BatchNorm saw nothing of the data (mean 3)
    model.train()                                              # the right form: train mode for training
    assert not torch.equal(model(x), model(x))                 # dropout on
    fine_tune_step()
    assert model[1].running_mean.abs().max() > 0.05


def test_mlm_loss_against_the_language_model_targets_punishes_a_perfect_unmasker():
    """The listing scores the masked-LM output against the same `targets` as the LM loss. LM targets are the
    next tokens; an MLM is asked for the original token at each masked position (and nothing elsewhere)."""
    torch.manual_seed(0)
    V, T = 20, 8
    x = torch.stack([torch.randperm(V - 1)[:T] + 1 for _ in range(4)])  # (4, T) no repeats; 0 = [MASK]
    lm_targets = x[:, 1:]                                       # (4, T-1) next token
    masked = torch.rand(4, T) < 0.3
    masked[:, 0] = True                                        # at least one masked position per row
    unmasker = 20.0 * F.one_hot(x, V).float()                  # (4, T, V): a perfect MLM, sure of every x
    book = F.cross_entropy(unmasker[:, :-1].reshape(-1, V), lm_targets.reshape(-1))
    mlm_labels = torch.where(masked, x, torch.full_like(x, -100))   # the originals, at the masked places only
    right = F.cross_entropy(unmasker.reshape(-1, V), mlm_labels.reshape(-1), ignore_index=-100)
    assert book.item() > 10.0 and right.item() < 1e-6          # the book's loss calls a perfect MLM terrible


def test_second_step_without_zero_grad_steps_on_the_sum_of_both_losses():
    """model.zero_grad() runs once per batch, before the LM loss; the MLM loss then adds its gradient to the
    LM's (already used by optimizer.step()), so the second step applies the LM gradient a second time."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y_lm, y_mlm = torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.zero_grad()
    F.cross_entropy(model(x), y_lm).backward()
    g_lm = model.weight.grad.clone()
    opt.step()
    F.cross_entropy(model(x), y_mlm).backward()                # the listing: no zero_grad in between
    g_stepped = model.weight.grad.clone()
    model.zero_grad()                                          # the right form: zero first
    F.cross_entropy(model(x), y_mlm).backward()
    g_mlm = model.weight.grad.clone()
    assert torch.allclose(g_stepped, g_lm + g_mlm, atol=1e-6) and not torch.allclose(g_stepped, g_mlm)


# ---- [难点和问题 §5.2]: DistilBertModel is the bare encoder: no classifier head ---------------------------------

def test_bare_encoder_output_has_no_class_logits_for_cross_entropy():
    """Emulated: the bare model (DistilBertModel) returns an output object holding `last_hidden_state`
    (B, T, d), not class logits. CrossEntropyLoss refuses the object; the hidden states are no (B, classes)
    either; and the evaluation's `outputs.data` does not exist. What is missing: a classification head."""
    class BaseOutput:                                          # what a bare encoder hands back
        def __init__(self, last_hidden_state):
            self.last_hidden_state = last_hidden_state
    torch.manual_seed(0)
    body = nn.Embedding(100, 16)                               # stand-in encoder: (B, T) ids -> (B, T, 16)
    ids, labels = torch.randint(0, 100, (4, 7)), torch.tensor([0, 1, 1, 0])
    outputs = BaseOutput(body(ids))
    with pytest.raises(TypeError, match="must be Tensor"):
        nn.CrossEntropyLoss()(outputs, labels)
    with pytest.raises((RuntimeError, ValueError)):
        nn.CrossEntropyLoss()(outputs.last_hidden_state, labels)    # (4, 7, 16) against (4,) labels
    with pytest.raises(AttributeError):
        outputs.data
    head = nn.Linear(16, 2)                                    # the right form: a head on the first position
    logits = head(outputs.last_hidden_state[:, 0])             # (B, 2)
    nn.CrossEntropyLoss()(logits, labels).backward()
    assert logits.shape == (4, 2) and body.weight.grad is not None and head.weight.grad is not None


# ---- [难点和问题 §4.4]: V* and π* multiply the reward by V*, with no discount -----------------------------------

def test_book_bellman_optimality_multiplies_reward_by_value_and_cannot_choose_at_s1():
    """The book: V*(s) = max_a Σ P(s'|s,a) Σ_r r P(r|s') V*(s'), and π*(s) = argmax_a of the same sum. Run on
    the moves of [难点和问题 §4.5] (r = 1 on reaching s = 3): from V = 0 it never leaves 0; from V = 1 it stops
    at V(1) = 0, and π*(1) has a tie. The right backup Σ p(s', r|s, a)[r + γ V*(s')] gives V* = (9, 10, 10)
    and π*(1) = U."""
    reward = {1: 0.0, 2: 0.0, 3: 1.0}                          # r depends on s' only

    def book_backup(V):
        return {s: max(reward[MOVES[(s, a)]] * V[MOVES[(s, a)]] for a in "UD") for s in (1, 2, 3)}

    def right_backup(V, gamma=0.9):
        return {s: max(reward[MOVES[(s, a)]] + gamma * V[MOVES[(s, a)]] for a in "UD") for s in (1, 2, 3)}
    V = {1: 0.0, 2: 0.0, 3: 0.0}
    for _ in range(50):
        V = book_backup(V)
    assert V == {1: 0.0, 2: 0.0, 3: 0.0}                       # reward times a zero value: nothing ever moves
    V = {1: 1.0, 2: 1.0, 3: 1.0}
    for _ in range(50):
        V = book_backup(V)
    assert V == {1: 0.0, 2: 1.0, 3: 1.0}                       # no γ: being at 3 for ever is worth 1, not 10
    book_q1 = {a: reward[MOVES[(1, a)]] * V[MOVES[(1, a)]] for a in "UD"}
    assert book_q1["U"] == book_q1["D"] == 0.0                 # the book's π*(1): a tie
    V = {1: 0.0, 2: 0.0, 3: 0.0}
    for _ in range(500):
        V = right_backup(V)
    assert V[1] == pytest.approx(9.0) and V[2] == pytest.approx(10.0) and V[3] == pytest.approx(10.0)
    q1 = {a: reward[MOVES[(1, a)]] + 0.9 * V[MOVES[(1, a)]] for a in "UD"}
    assert max(q1, key=q1.get) == "U"


# ---- [从理论到实践 §4.1]: R(x) = f_θ(x) scores the output alone, without its prompt ------------------------------

def test_a_reward_of_the_reply_alone_cannot_fit_preferences_that_depend_on_the_prompt():
    """Under prompt A reply 0 is preferred, under prompt B reply 1 (as "yes" is right for one question and
    "no" for another). A reward f(y) of the reply alone ranks the two replies the same way under both prompts,
    so it fits at most half the pairs; a reward r(x, y) of prompt and reply fits them all."""
    prompts, replies = torch.eye(2), torch.eye(2)
    pairs = [(0, 0, 1), (1, 1, 0)]                             # (prompt, chosen reply, rejected reply)

    def joint(x, y):                                           # features of (prompt, reply) together
        return torch.outer(prompts[x], replies[y]).flatten()
    reply_only, prompt_and_reply = nn.Linear(2, 1), nn.Linear(4, 1)
    score = {"f(y)": lambda x, y: reply_only(replies[y]),
             "r(x, y)": lambda x, y: prompt_and_reply(joint(x, y))}
    opt = torch.optim.SGD(list(reply_only.parameters()) + list(prompt_and_reply.parameters()), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        loss = sum(-F.logsigmoid(f(x, c) - f(x, r_)) for f in score.values() for x, c, r_ in pairs)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        fitted = {name: sum(bool(f(x, c) > f(x, r_)) for x, c, r_ in pairs) for name, f in score.items()}
        loss_f = sum(-F.logsigmoid(score["f(y)"](x, c) - score["f(y)"](x, r_)) for x, c, r_ in pairs) / 2
    assert fitted["r(x, y)"] == 2 and fitted["f(y)"] <= 1
    assert loss_f.item() == pytest.approx(math.log(2), abs=1e-3)     # the best f(y) can do: a coin flip
