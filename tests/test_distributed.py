"""More than one process (issue: torchrun, DDP): real 2-process runs on the CPU with gloo, tiny models.

- SFT and the reward model: the loss at every step equals the one-process run with the same global batch.
- PPO: both processes hold the same weights after several iterations, and the whole-batch statistics (advantage
  whitening, explained variance, the logged means and the KL that drives beta) equal those of the concatenated batch.
- Bad setups fail clearly: a world size that does not divide the batch; a process that dies (the other exits with
  a message, and no checkpoint is half-written).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, sft_dir  # noqa: F401
from data.plumbing import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HH = os.path.join(ROOT, "tests", "fixtures", "hh_rlhf_small.jsonl")


def run(*args, nproc=None, timeout=300):
    """`python script args` (nproc None) or `torchrun --standalone --nproc_per_node=N script args`."""
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + list(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


# ---- SFT and the reward model: the same losses as one process on the same global batch ----------------------------

def test_sft_two_processes_match_one_step_by_step(tmp_path):
    flags = TINY + ["--max_iters", "4", "--batch_size", "2", "--grad_accum", "2", "--lr", "1e-2", "--min_lr", "1e-2",
                    "--warmup_iters", "1", "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "1",
                    "--n_samples", "2"]
    one = run("train_sft.py", "--out_dir", str(tmp_path / "one"), *flags)
    two = run("train_sft.py", "--out_dir", str(tmp_path / "two"), *flags, nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "x 2 processes" in two.stdout and two.stdout.count("preset: cpu") == 1   # one process logs
    logs = {}
    for name in ("one", "two"):
        with open(tmp_path / name / "sft_log.csv") as f:
            rows = [line.strip().split(",") for line in f][1:]                 # step, train_loss, val_loss, lr
        logs[name] = [(float(r[1]) if r[1] else None, float(r[2]) if r[2] else None) for r in rows]
    assert len(logs["one"]) == len(logs["two"]) == 6                          # 4 train rows, 2 val rows
    for (t1, v1), (t2, v2) in zip(logs["one"], logs["two"]):
        assert (t1 is None) == (t2 is None) and (v1 is None) == (v2 is None)
        assert t1 is None or t2 == pytest.approx(t1, rel=1e-4), (t1, t2)
        assert v1 is None or v2 == pytest.approx(v1, rel=1e-4), (v1, v2)
    a = load_checkpoint(str(tmp_path / "one" / "sft.pt"), made_by="train_sft.py")["model"]
    b = load_checkpoint(str(tmp_path / "two" / "sft.pt"), made_by="train_sft.py")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert not list((tmp_path / "two").glob("*.tmp"))


def test_reward_model_two_processes_match_one_step_by_step(tmp_path, sft_dir):
    flags = ["--data", HH, "--n_heldout", "4", "--k", "2", "--max_new_tokens", "4", "--epochs", "2",
             "--batch_size", "3", "--eval_interval", "100", "--device", "cpu"]   # 9 items: 3 batches of 3
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sft.pt").write_bytes((sft_dir / "sft.pt").read_bytes())
    one = run("train_rm.py", "--out_dir", str(tmp_path / "one"), *flags)
    two = run("train_rm.py", "--out_dir", str(tmp_path / "two"), *flags, nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    h1, h2 = (load_checkpoint(str(tmp_path / n / "rm.pt"), made_by="train_rm.py")["history"] for n in ("one", "two"))
    l1, l2 = ([h["train_loss"] for h in h if "train_loss" in h] for h in (h1, h2))
    assert len(l1) == len(l2) >= 3
    assert l2 == pytest.approx(l1, rel=1e-4)
    # the held-out panel labels were sampled by both processes, each its share, and written once, whole
    with open(tmp_path / "two" / "panel_labels_heldout.jsonl") as f:
        assert sum(1 for _ in f) >= 3


# ---- PPO: the same weights everywhere, whole-batch statistics -----------------------------------------------------

HARNESS = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import train_ppo
out, seen = sys.argv[2], {}
real = train_ppo.final_report
def spy(s, m, *args):                                     # keep the Models of this process
    seen["m"] = m
    return real(s, m, *args)
train_ppo.final_report = spy
train_ppo.main(["--out_dir", out] + sys.argv[3:])
rank = int(os.environ.get("RANK", "0"))
m = seen["m"]
torch.save({"policy": m.policy.state_dict(), "critic": m.critic.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
'''


def test_ppo_two_processes_keep_identical_weights(tmp_path, sft_dir):
    import shutil
    d = tmp_path / "ppo"
    d.mkdir()
    shutil.copy(sft_dir / "sft.pt", d / "sft.pt")
    rm = run("train_rm.py", "--out_dir", str(d), "--n_prompts", "8", "--n_heldout", "4", "--k", "2",
             "--max_new_tokens", "4", "--epochs", "1", "--batch_size", "8", "--device", "cpu",
             "--readout", "mean")          # one step from a random head: scores that vary (the sum's head starts at 0)
    assert rm.returncode == 0, rm.stderr[-2000:]
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    two = run(str(harness), ROOT, str(d), "--iters", "3", "--batch_size", "4", "--minibatch_size", "2",
              "--ppo_epochs", "2", "--max_new_tokens", "6", "--n_eval", "4", "--n_report", "4", "--eval_interval", "3",
              "--device", "cpu", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    r0, r1 = (torch.load(d / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("policy", "critic"):
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    ck = load_checkpoint(str(d / "ppo.pt"), made_by="train_ppo.py")
    assert ck["iter"] == 3 and all(torch.equal(ck["model"][k], r0["policy"][k]) for k in ck["model"])
    rep = json.loads((d / "ppo_report.json").read_text())
    assert rep["processes"] == 2 and rep["n"] == 4 and len(rep["examples"]) == 4


WHOLE_BATCH = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from ppo import whiten, explained_variance, masked_mean
from data.plumbing import all_sum
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x, v = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
rows = slice(rank * 3, rank * 3 + 3)                      # each process holds half of the episodes
mine = whiten(x[rows], mask[rows], total=all_sum), explained_variance(v[rows], x[rows], mask[rows], total=all_sum)
mean = masked_mean(x[rows], mask[rows], total=all_sum)
parts = [None] * size
dist.all_gather_object(parts, (mine[0], mine[1], mean))
if rank == 0:
    dist.destroy_process_group()                          # back to one process: the concatenated batch
    whole = whiten(x, mask)
    assert torch.allclose(torch.cat([p[0] for p in parts]), whole), "whitening"
    assert all(torch.allclose(p[1], explained_variance(v, x, mask)) for p in parts), "explained variance"
    assert all(torch.allclose(p[2], masked_mean(x, mask)) for p in parts), "masked mean"
    assert not torch.allclose(whiten(x[:3], mask[:3]), whole[:3])      # a half alone would differ
    print("whole-batch statistics equal")
else:
    dist.destroy_process_group()
'''


def run_two_processes(tmp_path, source, expect):
    """Write `source` to a script, run it as 2 torchrun processes, and check it printed `expect`."""
    script = tmp_path / "script.py"
    script.write_text(source)
    r = run(str(script), ROOT, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert expect in r.stdout


def test_whitening_and_statistics_are_those_of_the_concatenated_batch(tmp_path):
    run_two_processes(tmp_path, WHOLE_BATCH, "whole-batch statistics equal")


LOG_ROW = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import train_ppo
from data.prepare import EOT, get_tokenizer
from data.panel import Panel
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
enc, panel = get_tokenizer(), Panel()
texts = ["I love thee, sweet friend.", "Out, vile villain!", "Good night.", "Ay, my lord, I thank you."]
torch.manual_seed(0)
def experience(texts):
    ids = [enc.encode_ordinary(" " + t) + [EOT] for t in texts]
    R = max(map(len, ids))
    seq = torch.full((len(ids), 1 + R), EOT)
    mask = torch.zeros(len(ids), R, dtype=torch.bool)
    for i, t in enumerate(ids):
        seq[i, 1:1 + len(t)], mask[i, :len(t)] = torch.tensor(t), True
    g = torch.Generator().manual_seed(len(texts))
    lp, ref = torch.randn(len(ids), R, generator=g), torch.randn(len(ids), R, generator=g)
    kl = torch.where(mask, lp - ref, 0.0)
    scores = torch.randn(len(ids), generator=g)
    roll = train_ppo.Rollout(seq, torch.zeros(len(ids), dtype=torch.long), mask)
    return train_ppo.Experience(roll, lp, ref, lp, scores, torch.ones(len(ids), dtype=torch.bool), kl, kl, kl, kl, 0.1)
whole = experience(texts)
keep = [rank, rank + size]                                    # this process's episodes of the whole batch
part = train_ppo.Experience(train_ppo.Rollout(whole.roll.seq[keep], whole.roll.pad[keep], whole.roll.resp_mask[keep]),
                            *[getattr(whole, k)[keep] for k in ("logprobs", "ref_logprobs", "values", "rm_scores",
                                                               "ended", "rewards", "kl", "advantages", "returns")], 0.1)
row = train_ppo.log_row(1, part, {}, panel, enc, (0, 0, 0))
rows = [None] * size
dist.all_gather_object(rows, row)
dist.destroy_process_group()
if rank == 0:
    alone = train_ppo.log_row(1, whole, {}, panel, enc, (0, 0, 0))          # one process, the whole batch
    for k in ("rm_score", "reward", "gold", "kl", "kl_k3", "reply_len", "ended"):
        assert all(abs(r[k] - alone[k]) < 1e-9 for r in rows), (k, [r[k] for r in rows], alone[k])
    print("logged means equal")
'''


def test_logged_means_and_the_kl_for_beta_are_those_of_the_whole_batch(tmp_path):
    run_two_processes(tmp_path, LOG_ROW, "logged means equal")


# ---- bad setups --------------------------------------------------------------------------------------------------

def test_default_grad_accum_under_torchrun_is_rounded_up_and_trains(tmp_path):
    r = run("train_sft.py", "--out_dir", str(tmp_path / "sft"), *TINY, "--max_iters", "2", "--grad_accum", "1", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "grad_accum rounded up to 2, a multiple of the 2 processes" in r.stdout
    assert load_checkpoint(str(tmp_path / "sft" / "sft.pt"), made_by="x")["config"]["grad_accum"] == 2


def test_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    r = run("train_ppo.py", "--out_dir", str(tmp_path), "--batch_size", "5", "--device", "cpu", nproc=2)
    assert r.returncode != 0 and "--batch_size 5 and --minibatch_size 16 must be multiples of the 2" in r.stderr
    assert not (tmp_path / "sft.pt").exists() and "[rank0]: Traceback" not in r.stderr   # (torchrun's own
    # launcher prints a traceback of its ChildFailedError after the processes' one-line errors)


DIE = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import train_sft
real = train_sft.val_loss
calls = [0]
def dying(*args):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:       # process 1 dies at the second evaluation
        os._exit(3)
    return real(*args)
train_sft.val_loss = dying
try:
    train_sft.main(sys.argv[2:])
except SystemExit as e:
    print(e.code, file=sys.stderr)
    raise
'''


def test_a_process_that_dies_stops_the_run_and_leaves_whole_checkpoints(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    out = tmp_path / "out"
    r = run(str(script), ROOT, "--out_dir", str(out), *TINY, "--max_iters", "6", "--batch_size", "2", "--grad_accum",
            "2", "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "1", nproc=2, timeout=180)
    assert r.returncode != 0
    assert "process 0 of 2 stopped: another process of the run ended" in r.stderr or "exitcode" in r.stderr
    ckpt = load_checkpoint(str(out / "sft.pt"), made_by="train_sft.py")     # the first evaluation's: whole
    assert ckpt["step"] == 2 and not list(out.glob("*.tmp"))
