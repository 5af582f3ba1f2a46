"""End to end: `python train_ppo.py` on an empty out_dir trains sft.pt, then rm.pt, then runs PPO and writes
ppo.pt, the plot and the report (tiny models, a few iterations: well under 2 minutes on a 2-core CPU).
Also: --resume continues, beta = 0 keeps beta at 0, and the score step's pieces line up."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
from model import EOT, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 128 --batch_size 4 --eval_iters 1 --max_iters 6 " \
           "--lr 1e-2 --min_lr 1e-2 --warmup_iters 2 --eval_interval 3 --log_interval 3 --device cpu"
TINY_RM = "--n_prompts 16 --n_heldout 6 --k 2 --max_new_tokens 8 --epochs 1 --batch_size 8 --eval_interval 2 --device cpu"
TINY_PPO = ["--iters", "3", "--batch_size", "6", "--minibatch_size", "3", "--ppo_epochs", "2", "--max_new_tokens", "8",
            "--n_eval", "6", "--n_report", "8", "--eval_interval", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole pipeline from nothing, as a student runs it (in a subprocess, with tiny settings)."""
    d = tmp_path_factory.mktemp("pipeline")
    r = subprocess.run([sys.executable, "train_ppo.py", "--out_dir", str(d), "--sft_args", TINY_SFT,
                        "--rm_args", TINY_RM] + TINY_PPO, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return d, r


def test_pipeline_trains_what_is_missing_and_writes_the_report(pipeline):
    d, r = pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft.pt is missing: running train_sft.py first" in r.stdout
    assert "rm.pt is missing: running train_rm.py first" in r.stdout
    for name in ("sft.pt", "rm.pt", "ppo.pt", "ppo_curves.png", "ppo_report.json", "ppo_report.md"):
        assert (d / name).exists(), name
    rep = json.loads((d / "ppo_report.json").read_text())
    for key in ("rm_score", "rm_score_sft", "gold", "gold_sft", "kl", "kl_k3", "win_rate", "vote_rate"):
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


def test_resume_continues_from_the_saved_iteration(pipeline, monkeypatch, capsys):
    d, _ = pipeline
    monkeypatch.setattr(train_ppo, "plot", lambda history, path: None)
    torch.set_num_threads(1)
    train_ppo.main(["--out_dir", str(d), "--resume"] + TINY_PPO[:1] + ["4"] + TINY_PPO[2:])
    out = capsys.readouterr().out
    assert "resuming from" in out and "at iteration 3" in out
    assert "iter   4/4" in out and "iter   3/4" not in out
    assert load_checkpoint(str(d / "ppo.pt"), made_by="train_ppo.py")["iter"] == 4


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


def test_score_puts_the_penalty_on_replies_that_never_end(pipeline):
    # score(): replies without <|endoftext|> get no_eos_penalty as their score; rewards sum to score - beta*KL
    d, _ = pipeline
    s = train_ppo.Settings(out_dir=str(d), no_eos_penalty=-7.0, device="cpu")
    from model import get_tokenizer
    from reward import RewardModel
    from sample import load_model
    policy, _ = load_model(str(d / "sft.pt"))
    ref, _ = load_model(str(d / "sft.pt"))
    rm_ckpt = load_checkpoint(str(d / "rm.pt"), made_by="train_rm.py")
    ctx = train_ppo.build_ctx(s, get_tokenizer(), "cpu", policy, ref, RewardModel.from_checkpoint(rm_ckpt),
                              RewardModel.from_checkpoint(rm_ckpt))
    seq = torch.tensor([[11, 12, 13, 40, 41, EOT, EOT], [11, 12, 13, 40, 41, 42, 43]])  # P = 3, R = 4
    resp_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    b = train_ppo.score(ctx, {"seq": seq, "pad": torch.zeros(2, dtype=torch.long), "resp_mask": resp_mask}, beta=0.1)
    assert b["scores"][1].item() == -7.0 and b["scores"][0].item() != -7.0
    assert b["ended"] == 0.5
    assert (b["advantages"][~resp_mask] == 0).all() and (b["returns"][~resp_mask] == 0).all()
    kl = torch.where(resp_mask, b["logprobs"] - b["ref_logprobs"], 0.0)
    assert abs(b["kl_per_reply"] - kl.sum(1).mean().item()) < 1e-6
