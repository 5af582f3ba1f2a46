""""Change one thing" (README): every classroom exercise is an edit of ONE function in ONE file, or a flag.
Each test here makes the edit the way a student would, by replacing the function's body where it is defined
(edit() below: every caller, whatever its import style, then runs the new body), and shows that the training
or sampling path really calls it: the exercise changes what the path computes. A function that nothing calls
(the trap the course once had: editing reward.bradley_terry_loss changed nothing) fails here."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chat
import model
import ppo
import reward
import sample
import train_ppo
import train_rm
from model import GPT, GPTConfig
from data.prepare import EOT, encode_reply, format_prompt, get_tokenizer, words
from data.plumbing import save_checkpoint
from reward import RewardModel, reply_scores

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)
PROMPTS = ["How fares my lord?", "Good morrow.", "What news from Rome?", "Peace!"]


def edit(monkeypatch, fn, replacement):
    """A student's edit of `fn` in its own file: its code becomes replacement's (which runs with fn's globals)."""
    monkeypatch.setattr(fn, "__code__", replacement.__code__)


def tiny_models(**settings):
    torch.manual_seed(0)
    policy, rm = GPT(CFG), RewardModel(CFG)
    s = train_ppo.Settings(**{**dict(device="cpu", batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=8),
                              **settings})
    return train_ppo.build_models(s, "cpu", policy, copy.deepcopy(policy), rm, copy.deepcopy(rm))


def rollout_and_score(m, beta=0.1):
    roll = train_ppo.rollout(m, m.policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    return train_ppo.score(m, roll, beta)


# ---- 1. reward.py bradley_terry_loss: swap the pairwise loss (a hinge, or the book's relu version) --------------

def hinge(r_chosen, r_rejected):
    return F.relu(1.0 - (r_chosen - r_rejected)).mean()


def test_1_the_pairwise_loss_train_rm_uses_is_reward_bradley_terry_loss(monkeypatch):
    torch.manual_seed(0)
    rm, enc = RewardModel(CFG), get_tokenizer()
    batch = [{"kind": "comparison", "prompt": format_prompt(p), "prompts": [format_prompt(p)] * 2,
              "replies": [f"Good {p}", f"Bad {p}"], "tie": False, "meta": {}} for p in PROMPTS]
    s = train_rm.Settings()
    before, _ = train_rm.item_losses(s, rm, batch)
    edit(monkeypatch, reward.bradley_terry_loss, hinge)
    after, _ = train_rm.item_losses(s, rm, batch)
    with torch.no_grad():
        sc = reply_scores(rm, enc, [p for r in batch for p in r["prompts"]], [x for r in batch for x in r["replies"]])
    assert after.item() == pytest.approx(F.relu(1 - (sc[0::2] - sc[1::2])).mean().item(), rel=1e-5)
    assert after.item() != pytest.approx(before.item())


# ---- 2. ppo.py gae (or the flag --lam): the advantage estimator --------------------------------------------------

def no_advantage(rewards, values, resp_mask, gamma=1.0, lam=0.95):
    return torch.zeros_like(rewards), torch.where(resp_mask, rewards, 0.0)


def test_2_the_advantages_train_ppo_learns_from_come_from_ppo_gae(monkeypatch):
    m = tiny_models(whiten_advantages=False)
    exp = rollout_and_score(m)
    assert exp.advantages[exp.roll.resp_mask].abs().sum() > 0
    lam0 = rollout_and_score(tiny_models(whiten_advantages=False, lam=0.0))    # the flag reaches gae too
    assert not torch.allclose(lam0.advantages, exp.advantages)
    edit(monkeypatch, ppo.gae, no_advantage)
    assert (rollout_and_score(tiny_models()).advantages == 0).all()


# ---- 3. train_ppo.py shape_rewards: a repetition penalty (or any reward shaping) ---------------------------------

def with_penalty(s, rm_scores, ended, logprobs, ref_logprobs, resp_mask, beta, replies):
    scores = rm_scores.clamp(-s.score_clip, s.score_clip)
    scores = apply_no_eos_penalty(scores, ended, s.no_eos_penalty)                  # noqa: F821
    repeats = torch.tensor([len(ws) - len(set(ws)) for ws in map(words, replies)])  # noqa: F821  the edit:
    scores = scores - 0.5 * repeats.to(scores)                                       # 0.5 per repeated word
    return per_token_rewards(scores, logprobs, ref_logprobs, resp_mask, beta)       # noqa: F821


def repeated_words(text):
    ws = words(text)
    return len(ws) - len(set(ws))


def known_rollout(m, replies):
    """A rollout whose replies are the given texts (each ended by <|endoftext|>), prompts left-padded."""
    prompts = [get_tokenizer().encode_ordinary(format_prompt(p)) for p in PROMPTS[:len(replies)]]
    answers = [encode_reply(get_tokenizer(), r) for r in replies]
    R = max(len(a) for a in answers)
    P = max(len(p) for p in prompts)
    seq = torch.tensor([[EOT] * (P - len(p)) + p + a + [EOT] * (R - len(a)) for p, a in zip(prompts, answers)])
    pad = torch.tensor([P - len(p) for p in prompts])
    resp_mask = torch.tensor([[i < len(a) for i in range(R)] for a in answers])
    return train_ppo.Rollout(seq, pad, resp_mask)


def test_3_a_repetition_penalty_in_shape_rewards_reaches_training_and_both_sides_of_the_evaluation(monkeypatch):
    from data.panel import Panel
    m, panel = tiny_models(), Panel()
    replies = ["Good, good, good my lord.", "Thou art kind and gentle.", "No, no.", "Well met."]
    roll = known_rollout(m, replies)
    assert [repeated_words(r) for r in replies] == [2, 0, 1, 0]
    exp = train_ppo.score(m, roll, 0.1)
    sides = [train_ppo.judge(m, panel, model, PROMPTS, seed=1) for model in (m.ref, m.policy)]
    edit(monkeypatch, train_ppo.shape_rewards, with_penalty)
    exp2 = train_ppo.score(m, roll, 0.1)                                             # what PPO learns from
    assert torch.allclose(exp2.rewards.sum(1), exp.rewards.sum(1) - torch.tensor([1.0, 0.0, 0.5, 0.0]),
                          atol=1e-5)
    for before, model_ in zip(sides, (m.ref, m.policy)):                             # what the report measures
        after = train_ppo.judge(m, panel, model_, PROMPTS, seed=1)
        penalty = np.array([0.5 * repeated_words(t) for t in after["text"]])
        assert after["text"] == before["text"]
        assert after["reward"] == pytest.approx(before["reward"] - penalty, abs=1e-5)
        assert after["rm_score"] == pytest.approx(before["rm_score"], abs=1e-6)   # the RM's own score: unshaped


# ---- 4. model.py Positions: another positional encoding (none, or learned) --------------------------------------

def no_positions(max_len, d_model):
    return torch.zeros(max_len, d_model)


def learned_init(self, cfg):                                     # the student's Positions.__init__ ...
    nn.Module.__init__(self)
    self.table = nn.Embedding(cfg.block_size, cfg.n_embd)


def learned_forward(self, pos):                                  # ... and Positions.forward
    return self.table(pos)


def test_4_the_gpt_adds_model_positions_and_a_checkpoint_keeps_its_own(monkeypatch):
    idx = torch.randint(0, 100, (1, 12))
    torch.manual_seed(0)
    sinusoidal = GPT(CFG).eval()
    with_pe = sinusoidal(idx)
    ckpt = {"model_args": dataclasses.asdict(CFG), "model": sinusoidal.state_dict()}
    assert "wpe.pe" in ckpt["model"]                             # the table travels with the weights
    edit(monkeypatch, model.sinusoidal_positions, no_positions)   # C4 "none"
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    assert (m.wpe.pe == 0).all() and not torch.allclose(m(idx), with_pe)
    assert torch.equal(model.gpt_from_checkpoint(ckpt).eval()(idx), with_pe)   # an old file: its own table


def test_4_learned_positions_are_one_class_trained_saved_and_an_old_file_is_refused(monkeypatch):
    monkeypatch.setattr(model.Positions, "__init__", learned_init)   # the student rewrites the class's two
    monkeypatch.setattr(model.Positions, "forward", learned_forward)  # methods in model.py
    torch.manual_seed(0)
    m = GPT(CFG)
    idx = torch.randint(0, 100, (2, 12))
    m(idx[:, :-1], idx[:, 1:]).backward()
    assert m.wpe.table.weight.grad[:11].abs().sum() > 0          # the table is learned: it gets a gradient
    assert any(n == "wpe.table.weight" for n, _ in m.named_parameters())
    ckpt = {"model_args": dataclasses.asdict(CFG), "model": m.state_dict()}
    assert torch.equal(model.gpt_from_checkpoint(ckpt).eval()(idx), m.eval()(idx))  # saved and loaded back
    monkeypatch.undo()
    with pytest.raises(ValueError, match="wpe.table.weight"):     # a learned-positions file in today's GPT
        model.gpt_from_checkpoint(ckpt)


# ---- 5. sample.py: a new sampling knob (e.g. min-p) is a field of Sampling, a rule, a step in filter_logits ---------

def argmax_only(logits, temperature=1.0, top_k=None, top_p=None):
    return torch.where(logits == logits.max(dim=-1, keepdim=True).values, logits, torch.full_like(logits, -1e9))


def test_5_a_sampling_knob_is_one_file(monkeypatch):
    # every field of sample.Sampling is a flag of sample.py and of chat.py, and a chat command
    names = [f.name for f in dataclasses.fields(sample.Sampling)]
    assert issubclass(sample.Settings, sample.Sampling) and issubclass(chat.Settings, sample.Sampling)
    assert chat.KNOBS == names and all(chat.knob_named("/" + n) == n for n in names)
    assert all(f"/{n} X" in chat.HELP for n in names)
    # and what generate() samples from is sample.filter_logits' output
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    with torch.no_grad():
        m.wte.weight.mul_(10)
    ids = [get_tokenizer().encode_ordinary(format_prompt(p)) for p in PROMPTS]
    greedy, _, _ = sample.generate(m, ids, 6, greedy=True)
    sampled, _, _ = sample.generate(m, ids, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, greedy)
    edit(monkeypatch, sample.filter_logits, argmax_only)
    edited, _, _ = sample.generate(m, ids, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(edited, greedy)


# ---- 6. train_ppo.py critic_from_reward_model: how the critic starts ----------------------------------------------

def zero_critic(critic):
    with torch.no_grad():
        critic.head.weight.zero_()
        critic.head.bias.zero_()
    return critic


def test_6_the_critic_starts_as_critic_from_reward_model_makes_it(monkeypatch, tmp_path):
    torch.manual_seed(0)
    gpt, rm = GPT(CFG), RewardModel(CFG)
    save_checkpoint({"model": gpt.state_dict(), "model_args": dataclasses.asdict(CFG), "kind": "sft"},
                    str(tmp_path / "sft.pt"))
    save_checkpoint(rm.checkpoint_dict(), str(tmp_path / "rm.pt"))
    paths = {"sft": str(tmp_path / "sft.pt"), "rm": str(tmp_path / "rm.pt")}
    s = train_ppo.Settings(device="cpu", max_new_tokens=8)
    idx = torch.randint(0, 100, (2, 9))
    m, _, _ = train_ppo.setup(s, "cpu", paths)
    assert m.critic.values(idx).abs().sum() > 0
    edit(monkeypatch, train_ppo.critic_from_reward_model, zero_critic)
    m, _, _ = train_ppo.setup(s, "cpu", paths)
    assert (m.critic.values(idx) == 0).all()


# ---- 7. ppo.py per_token_rewards: the KL estimator in the reward, k1 -> k3 --------------------------------------------

def k3_rewards(scores, logprobs, ref_logprobs, resp_mask, beta):
    kl = torch.where(resp_mask, kl_k3(logprobs, ref_logprobs), 0.0)  # noqa: F821  (ppo.py's own kl_k3)
    n_valid = resp_mask.sum(dim=1)
    last = (n_valid - 1).clamp(min=0)
    score = torch.where(n_valid > 0, scores.to(kl.dtype), 0.0)
    return (-beta * kl).scatter_add(1, last[:, None], score[:, None]), kl


def test_7_the_kl_in_the_reward_is_ppo_per_token_rewards(monkeypatch):
    m = tiny_models()
    with torch.no_grad():                                   # a policy that differs from the reference
        for p in m.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exp = rollout_and_score(m)
    assert (exp.kl < 0).any()                               # k1 per token can be negative
    edit(monkeypatch, ppo.per_token_rewards, k3_rewards)
    exp3 = rollout_and_score(m)
    mask = exp3.roll.resp_mask
    assert (exp3.kl >= 0).all() and torch.allclose(exp3.kl[mask], ppo.kl_k3(exp3.logprobs, exp3.ref_logprobs)[mask])


# ---- 8. the flag --vf_clip inf (ppo.py ppo_loss): the value clip off ----------------------------------------------

def test_8_vf_clip_reaches_ppo_loss():
    clipped = tiny_models(vf_clip=1e-6, critic_lr=1e-2, minibatch_size=2)
    stats = train_ppo.update(clipped, rollout_and_score(clipped))
    assert stats["value_clipfrac"] > 0                                          # after the first step: clipped
    free = tiny_models(vf_clip=float("inf"), critic_lr=1e-2, minibatch_size=2)
    assert train_ppo.update(free, rollout_and_score(free))["value_clipfrac"] == 0.0


# ---- 9. the flags --ppo_epochs 1 --minibatch_size BATCH --lam 1: REINFORCE with a baseline ----------------------------

def test_9_one_epoch_one_minibatch_never_clips():
    m = tiny_models(ppo_epochs=1, minibatch_size=4, lam=1.0, clip_eps=0.01)
    stats = train_ppo.update(m, rollout_and_score(m))
    assert stats["clipfrac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


# ---- 10. the flag --clip_eps: the trust region -----------------------------------------------------------------------

def test_10_clip_eps_reaches_ppo_loss():
    stats = {}
    for eps in (0.01, float("inf")):
        m = tiny_models(ppo_epochs=3, minibatch_size=2, clip_eps=eps, lr=1e-2)
        stats[eps] = train_ppo.update(m, rollout_and_score(m))
    assert stats[0.01]["clipfrac"] > 0 and stats[float("inf")]["clipfrac"] == 0.0


def test_the_replacements_run_with_the_names_of_the_file_they_edit():
    # edit() runs a replacement with the edited function's module globals: the names they use are there
    # (C3's two lines in shape_rewards use words and torch; C4's learned table nn.Embedding; C1's hinge F.relu)
    for mod, names in ((train_ppo, ("apply_no_eos_penalty", "per_token_rewards", "words", "torch")),
                       (ppo, ("kl_k3", "torch")), (reward, ("F",)), (model, ("torch", "nn")), (sample, ("torch",))):
        assert all(hasattr(mod, n) for n in names), mod.__name__


def test_the_chinese_sheet_gives_every_exercise_its_command_place_outcome_and_undo():
    """tests/README_zh.md 练习: every C1-C10 and E1-E8 is a row whose cells are all filled: where to edit (a file
    and a function, or a flag), the command (a training command in its own --out_dir, never over out/'s
    checkpoints), what to look at, the measured outcome, how to undo. Each C row has its route test here."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    zh = open(os.path.join(root, "tests", "README_zh.md"), encoding="utf-8").read()
    sheet = zh[zh.index("\n## 练习"):]
    rows = {}
    for line in sheet.split("\n"):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and re.fullmatch(r"[CE]\d+", cells[0]):
            rows[cells[0]] = cells
    assert sorted(rows) == sorted([f"C{i}" for i in range(1, 11)] + [f"E{i}" for i in range(1, 9)])
    here = open(os.path.abspath(__file__), encoding="utf-8").read()
    for key, cells in rows.items():
        if key.startswith("C"):
            _, _, _, where, command, look, outcome, undo = cells
        else:
            _, _, where, command, look, outcome, undo = cells
        assert all((where, command, look, outcome, undo)), key
        assert re.search(r"`\w+\.py`|参数 `--", where), (key, where)
        if not command.startswith("见 C"):
            for run in re.findall(r"python (train_\w+\.py[^`]*)", command):
                assert re.search(r"--out_dir out/\w+", run), (key, run)    # its own folder, never out/ itself
        assert re.search(r"\d", outcome), (key, outcome)                 # a measured figure
        assert "git checkout" in undo or "去掉" in undo or "见 C" in undo or "不用撤销" in undo, (key, undo)
        if key.startswith("C"):
            assert re.search(rf"^def test_{key[1:]}_", here, re.M), key
