"""End to end: `python train_ppo.py` on an empty out_dir trains sft.pt, then rm.pt, then runs PPO and writes
ppo.pt, the plot and the report (tiny models, a few iterations: well under 2 minutes on a 2-core CPU).
Also: --resume continues, beta = 0 keeps beta at 0, and the score step's pieces line up."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import ppo
import train_ppo
from model import GPT, GPTConfig
from data.prepare import EOT, get_tokenizer
from data.plumbing import load_checkpoint
from reward import RewardModel

from conftest import ROOT, TINY_PPO, pipeline  # noqa: F401  (pipeline: the tiny sft -> rm -> ppo run, once)


def test_pipeline_trains_what_is_missing_and_writes_the_report(pipeline):
    d, r = pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft.pt is missing: running train_sft.py first" in r.stdout
    assert "rm.pt is missing: running train_rm.py first" in r.stdout
    for name in ("sft.pt", "rm.pt", "ppo.pt", "ppo_curves.png", "overoptimisation.png", "ppo_report.json", "ppo_report.md"):
        assert (d / name).exists(), name
    rep = json.loads((d / "ppo_report.json").read_text())
    for key in ("rm_score", "rm_score_sft", "reward", "reward_sft", "gold", "gold_sft", "kl", "kl_k3", "win_rate",
                "vote_rate", "reply_words", "reply_words_sft", "real_word_rate", "real_word_rate_sft"):
        assert isinstance(rep[key], float), key
    assert 0.0 <= rep["win_rate"] <= 1.0 and 0.0 <= rep["vote_rate"] <= 1.0 and rep["n"] == 8
    assert len(rep["examples"]) == 8 and all(len(e) == 3 for e in rep["examples"])
    assert "win rate vs SFT" in r.stdout and "KL(PPO || SFT)" in r.stdout
    md = (d / "ppo_report.md").read_text()
    assert "| panel gold score |" in md and "**PPO:**" in md


def test_ppo_checkpoint_holds_policy_critic_and_history(pipeline):
    d, _ = pipeline
    ck = load_checkpoint(str(d / "ppo.pt"), made_by="train_ppo.py")
    assert ck["kind"] == "ppo" and ck["iter"] == 3
    assert "critic" in ck and "optimizer" in ck and ck["kl_coef"] > 0
    rows = [h for h in ck["history"] if "rm_score" in h]
    assert [h["iter"] for h in rows] == [1, 2, 3]
    evals = [h for h in ck["history"] if "eval_win_rate" in h]
    assert [h["iter"] for h in evals] == [2, 3]
    # the policy moved away from the SFT model (the update did something)
    sft = load_checkpoint(str(d / "sft.pt"), made_by="train_sft.py")
    assert any(not torch.equal(ck["model"][k], sft["model"][k]) for k in sft["model"])


def test_resume_continues_from_the_saved_iteration(pipeline, tmp_path, monkeypatch, capsys):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(pipeline[0], d)
    monkeypatch.setattr(train_ppo, "plot", lambda history, path: None)
    torch.set_num_threads(1)
    train_ppo.main(["--out_dir", str(d), "--resume", "--lr", "3e-5"] + TINY_PPO[:1] + ["4"] + TINY_PPO[2:])
    out = capsys.readouterr().out
    assert "resuming from" in out and "at iteration 3" in out
    assert "iter   4/4" in out and "iter   3/4" not in out
    assert "resume: lr 0.0001 -> 3e-05 (from the command line)" in out        # applied, not the saved lr
    ck = load_checkpoint(str(d / "ppo.pt"), made_by="train_ppo.py")
    assert ck["iter"] == 4 and ck["config"]["lr"] == 3e-5 and ck["optimizer"]["param_groups"][0]["lr"] == 3e-5


def test_fixed_beta_zero_stays_zero(pipeline, tmp_path, monkeypatch, capsys):
    # the reward-hacking exercise: no KL penalty at all
    d, _ = pipeline
    for name in ("sft.pt", "rm.pt"):
        os.symlink(d / name, tmp_path / name)
    monkeypatch.setattr(train_ppo, "plot", lambda history, path: None)
    torch.set_num_threads(1)
    train_ppo.main(["--out_dir", str(tmp_path), "--init_kl_coef", "0", "--adaptive_kl", "false"] + TINY_PPO)
    ck = load_checkpoint(str(tmp_path / "ppo.pt"), made_by="train_ppo.py")
    assert ck["kl_coef"] == 0.0
    assert all(h["beta"] == 0.0 for h in ck["history"] if "beta" in h)


def test_the_same_seed_gives_the_same_final_report(pipeline, tmp_path, monkeypatch):
    # a run is chaotic (a rounding difference changes every later sample) but not random: same seed, same report
    monkeypatch.setattr(train_ppo, "plot", lambda history, path: None)
    torch.set_num_threads(1)
    reports = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        for name in ("sft.pt", "rm.pt"):
            os.symlink(pipeline[0] / name, tmp_path / run / name)
        train_ppo.main(["--out_dir", str(tmp_path / run)] + TINY_PPO)
        report = json.loads((tmp_path / run / "ppo_report.json").read_text())
        reports.append({k: v for k, v in report.items() if not k.startswith("minutes")})   # all but the times
    assert reports[0] == reports[1]
    assert reports[0]["kl"] != 0                                  # the policy moved: the runs did something


def test_score_puts_the_penalty_on_replies_that_never_end(pipeline):
    # score(): replies without <|endoftext|> get no_eos_penalty as their score; rewards sum to score - beta*KL
    d, _ = pipeline
    s = train_ppo.Settings(out_dir=str(d), no_eos_penalty=-7.0, device="cpu", score_clip=float("inf"))
    m, _, _ = train_ppo.setup(s, "cpu", {"sft": str(d / "sft.pt"), "rm": str(d / "rm.pt")})
    seq = torch.tensor([[11, 12, 13, 40, 41, EOT, EOT], [11, 12, 13, 40, 41, 42, 43]])  # P = 3, R = 4
    resp_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    exp = train_ppo.score(m, train_ppo.Rollout(seq, torch.zeros(2, dtype=torch.long), resp_mask), beta=0.1)
    assert exp.ended.tolist() == [True, False]
    assert exp.rm_scores[1].item() != -7.0                                   # the reward model's own score
    kl = torch.where(resp_mask, exp.logprobs - exp.ref_logprobs, 0.0)         # (2, 4)
    assert torch.equal(exp.kl, kl)
    shaped = exp.rewards.sum(1) + 0.1 * kl.sum(1)                             # rewards = score - beta * KL
    assert shaped[1].item() == pytest.approx(-7.0, abs=1e-5)
    assert shaped[0].item() == pytest.approx(exp.rm_scores[0].item(), abs=1e-5)
    assert (exp.advantages[~resp_mask] == 0).all() and (exp.returns[~resp_mask] == 0).all()
    # the reward model's score is clipped in the reward (not in what the report shows as its score)
    s.score_clip = 1e-3
    clipped = train_ppo.score(m, train_ppo.Rollout(seq, torch.zeros(2, dtype=torch.long), resp_mask), beta=0.1)
    shaped = clipped.rewards.sum(1) + 0.1 * kl.sum(1)
    assert shaped[0].item() == pytest.approx(max(-1e-3, min(1e-3, exp.rm_scores[0].item())), abs=1e-6)
    assert torch.equal(clipped.rm_scores, exp.rm_scores)


# ---- the gpu preset's code paths, on a CPU: bf16 autocast and torch.compile ------------------------------------

PROMPTS = ["How fares my lord?", "Good morrow.", "What, ho! Who comes here at this late hour of the night?", "Peace!",
           "I pray you, sir, tell me your name and whence you come.", "Away!"]


def tiny_models(**settings):
    """train_ppo.build_models on randomly initialised tiny models (the same seed every call: identical models)."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, dropout=0.0)
    torch.manual_seed(0)
    policy, rm = GPT(cfg), RewardModel(cfg)
    s = train_ppo.Settings(device="cpu", batch_size=6, minibatch_size=3, ppo_epochs=1, max_new_tokens=8, **settings)
    return train_ppo.build_models(s, "cpu", policy, copy.deepcopy(policy), rm, copy.deepcopy(rm))


def test_bf16_autocast_scores_like_float32():
    # --dtype bfloat16 (the gpu preset): matmuls in bf16, but every per-token tensor PPO does arithmetic on
    # (log-probs, values, advantages) stays float32, and the numbers are float32's up to bf16 rounding.
    m32, m16 = tiny_models(), tiny_models(dtype="bfloat16")
    roll = train_ppo.rollout(m16, m16.policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    b16, b32 = train_ppo.score(m16, roll, 0.05), train_ppo.score(m32, roll, 0.05)
    for k, tol in (("logprobs", 1e-2), ("ref_logprobs", 1e-2), ("values", 5e-2), ("advantages", 5e-2),
                   ("returns", 5e-2), ("rm_scores", 5e-2)):
        x16, x32 = getattr(b16, k), getattr(b32, k)
        assert x16.dtype == torch.float32 and torch.isfinite(x16).all(), k
        assert (x16 - x32).abs().max().item() < tol, k
    assert not torch.equal(b16.values, b32.values)                          # autocast did run in bf16
    stats = train_ppo.update(m16, b16)
    assert all(v == v for k, v in stats.items() if k != "explained_var")   # no nan
    assert all(p.dtype == torch.float32 for p in m16.policy.parameters())


def test_compiled_iterations_match_eager_and_compile_only_in_the_first(monkeypatch):
    # --compile: each model's hidden_states, gae and ppo_loss go through torch.compile (dynamic shapes). Here
    # with dynamo's "eager" backend (graph capture and guards as on a GPU, no kernel generation). Every graph a
    # run needs is made in the first iteration and its evaluation (prefill and decode, with and without
    # gradients, trainable and frozen models); later iterations, with other prompt and reply lengths, reuse
    # them: no recompilation storm, and each function stays below dynamo's recompile limit (past it, dynamo
    # silently falls back to eager).
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries
    from torch._dynamo.utils import counters
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    ppo.fused.cache_clear()
    torch._dynamo.reset()
    try:
        compiled, eager = tiny_models(compile=True), tiny_models()
        batches = [PROMPTS, PROMPTS[::-1][:5] + ["Hence!"], [p + " Speak, I charge thee." for p in PROMPTS]]
        graphs = []
        for i, prompts in enumerate(batches):
            out = {}
            for name, m in (("compiled", compiled), ("eager", eager)):
                roll = train_ppo.rollout(m, m.policy, prompts, generator=torch.Generator().manual_seed(i))
                b = train_ppo.score(m, roll, 0.05)
                torch.manual_seed(i)                                          # the same minibatch order
                out[name] = roll, b, train_ppo.update(m, b)
                train_ppo.rollouts(m, m.ref, prompts[:2], seed=i)             # what the evaluation samples
            (rc, bc, sc), (re_, be, se) = out["compiled"], out["eager"]
            assert torch.equal(rc.seq, re_.seq), i
            for k in ("logprobs", "values", "advantages", "returns"):
                assert (getattr(bc, k) - getattr(be, k)).abs().max().item() < 1e-4, (i, k)
            assert abs(sc["pg_loss"] - se["pg_loss"]) < 1e-4 and abs(sc["vf_loss"] - se["vf_loss"]) < 1e-4
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[0] >= 3 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
        limit = torch._dynamo.config.recompile_limit
        for fn in (GPT.hidden_states, ppo.gae, ppo.ppo_loss):
            assert 1 <= len(cache_entries(fn.__code__)) < limit, fn.__name__
    finally:
        ppo.fused.cache_clear()
        torch._dynamo.reset()
