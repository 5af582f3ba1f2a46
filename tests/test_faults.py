"""Nothing lost, nothing silent: the fault-and-bad-input suite (README "What can go wrong").

Each test is a case a hostile new user tried: feedback that must never be dropped, checkpoints that must never
get worse, every bad setting refused before any work with one `error:` line naming the flag or file, and
kill -9 during every kind of write. Tiny models; the scripts run in this process where a fresh interpreter
is not what is being tested (run_main_block: the script's own `if __name__ == "__main__":` block)."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data.plumbing as P
import model as M
from conftest import ROOT, TINY, TINY_PPO, TINY_RM, pipeline, run_main_block, sft_dir  # noqa: F401
from data.feedback import read_feedback, write_feedback

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RATING = {"kind": "rating", "prompt": "p", "reply": "r", "rating": 3}


def error_line(capsys, code):
    """The one line an argparse-style rejection prints (exit status 2), or an `error:` exit (status text)."""
    err = capsys.readouterr().err
    if isinstance(code, str):                                  # sys.exit("error: ...") prints it, status 1
        return code
    assert code == 2, (code, err)
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def read_only_dir(path):
    """A folder nobody may write into, as root too (chattr +i), else chmod 555, else a /proc path."""
    path.mkdir()
    for cmd in (["chattr", "+i", str(path)], ["chmod", "555", str(path)]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            try:
                open(path / ".probe", "w").close()
                os.remove(path / ".probe")
            except OSError:
                return path
    return "/proc/not_a_folder_for_checkpoints"


def writable_again(path):
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    subprocess.run(["chmod", "755", str(path)], capture_output=True)


# ---- 1. lost data ---------------------------------------------------------------------------------------------

def test_feedback_appended_after_a_cut_short_line_is_readable_and_the_fragment_kept(tmp_path):
    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps(RATING) + '\n{"kind":"rating","prompt":"p","rep')
    note = write_feedback(str(fb), {**RATING, "rating": 4})
    recs, n_bad = read_feedback(str(fb))                                     # every line is a record again
    assert n_bad == 0 and [r["rating"] for r in recs] == [3.0, 4.0]
    assert (tmp_path / "fb.jsonl.partial").read_text() == '{"kind":"rating","prompt":"p","rep\n'
    assert "cut short" in note and "fb.jsonl.partial" in note
    fb.write_text(json.dumps(RATING))                                        # a whole record, just no newline
    assert "added one" in write_feedback(str(fb), RATING) and len(read_feedback(str(fb))[0]) == 2


def test_chat_heals_the_feedback_file_and_says_so(tmp_path, pipeline):
    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps(RATING) + '\n{"kind":"rating","prompt":"p","rep')
    r = subprocess.run([sys.executable, "chat.py", "--ckpt", str(pipeline[0] / "sft.pt"), "--rm", "none",
                        "--feedback", str(fb)], input="Good morrow\n/rate 4\n", capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "moved to" in r.stdout and "* saved a rating: 4" in r.stdout
    assert [x["rating"] for x in read_feedback(str(fb))[0]] == [3.0, 4.0]


def test_a_diverging_sft_run_never_overwrites_the_good_checkpoint(tmp_path, sft_dir):
    d = tmp_path / "out"
    shutil.copytree(sft_dir, d)
    before = (d / "sft.pt").read_bytes()
    step = torch.load(d / "sft.pt", weights_only=True)["step"]
    e = run_main_block("train_sft.py", "--out_dir", str(d), *TINY, "--resume", "--lr", "1e6", "--warmup_iters", "1",
                       "--eval_interval", "1", "--max_iters", "12")
    assert isinstance(e.code, str) and e.code.startswith("error: ")
    assert "diverged" in e.code or "loss is" in e.code
    assert f"The last good checkpoint is {d / 'sft.pt'} (step {step}), kept as it was" in e.code
    assert (d / "sft.pt").read_bytes() == before


def test_a_fresh_sft_run_at_a_huge_lr_stops_and_writes_nothing(tmp_path):
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path), *TINY, "--lr", "1e6", "--max_iters", "6",
                       "--eval_interval", "3", "--warmup_iters", "1")
    assert isinstance(e.code, str) and "No checkpoint was written" in e.code and not (tmp_path / "sft.pt").exists()


def test_a_diverging_ppo_run_never_replaces_the_checkpoint(tmp_path, pipeline, monkeypatch):
    import train_ppo
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)                        # a good ppo.pt is there
    args = ["--out_dir", str(d), "--lr", "1e6", "--critic_lr", "1e6", "--iters", "4", "--batch_size", "6",
            "--minibatch_size", "3", "--max_new_tokens", "8", "--n_eval", "4", "--n_report", "4", "--eval_interval",
            "1", "--device", "cpu"]
    monkeypatch.setattr(train_ppo, "plot", lambda history, path: None)
    before = (d / "ppo.pt").read_bytes()
    with pytest.raises(FloatingPointError) as e:           # weights of 1e6 are not a policy: never saved
        train_ppo.main(args)
    assert "diverged" in str(e.value) or "loss is" in str(e.value)
    assert f"The last good checkpoint is {d / 'ppo.pt'}" in str(e.value)
    assert (d / "ppo.pt").read_bytes() == before
    os.remove(d / "ppo.pt")
    args[args.index("--lr") + 1] = args[args.index("--critic_lr") + 1] = "1e-4"
    # and when the weights do go non-finite, the save refuses and names the file that really exists
    real = train_ppo.update

    def poisoned(m, exp):
        out = real(m, exp)
        with torch.no_grad():
            next(m.policy.parameters()).fill_(float("nan"))
        return out
    monkeypatch.setattr(train_ppo, "update", poisoned)
    before = (d / "ppo.pt").read_bytes() if (d / "ppo.pt").exists() else None
    with pytest.raises(FloatingPointError) as e:
        train_ppo.main(args)
    assert "weights are not finite" in str(e.value)
    assert (f"The last good checkpoint is {d / 'ppo.pt'}" in str(e.value)) == (before is not None)
    assert ((d / "ppo.pt").read_bytes() if before else None) == before


@pytest.mark.parametrize("bad", ["/proc/version", "a_folder", "read_only"])
def test_chat_refuses_an_unwritable_feedback_path_before_the_chat(tmp_path, pipeline, capsys, bad):
    import chat
    if bad == "a_folder":
        path = str(tmp_path)
    elif bad == "read_only":
        folder = read_only_dir(tmp_path / "ro")
        path = os.path.join(folder, "fb.jsonl")
    else:
        path = bad
    try:
        assert chat.main(["--ckpt", str(pipeline[0] / "sft.pt"), "--rm", "none", "--feedback", path]) == 1
    finally:
        writable_again(tmp_path / "ro")
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "feedback file" in err and path in err


# ---- 2. silent wrong results -------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, args, flag", [
    ("train_ppo.py", ["--lr", "-1"], "--lr must be > 0"),
    ("train_rm.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("train_ppo.py", ["--critic_lr", "0"], "--critic_lr must be > 0"),
    ("train_sft.py", ["--grad_accum", "0"], "--grad_accum must be >= 1"),
    ("train_sft.py", ["--max_iters", "0"], "--max_iters must be >= 1"),
    ("train_ppo.py", ["--iters", "0"], "--iters must be >= 1"),
    ("train_ppo.py", ["--n_eval", "0"], "--n_eval must be >= 1"),
    ("train_ppo.py", ["--n_report", "0"], "--n_report must be >= 1"),
    ("train_sft.py", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("train_ppo.py", ["--minibatch_size", "0"], "--minibatch_size must be >= 1"),
    ("train_ppo.py", ["--ppo_epochs", "0"], "--ppo_epochs must be >= 1"),
    ("train_sft.py", ["--eval_interval", "0"], "--eval_interval must be >= 1"),
    ("train_sft.py", ["--log_interval", "0"], "--log_interval must be >= 1"),
    ("train_sft.py", ["--eval_iters", "0"], "--eval_iters must be >= 1"),
    ("train_rm.py", ["--eval_interval", "0"], "--eval_interval must be >= 1"),
    ("train_rm.py", ["--k", "1"], "--k must be >= 2"),
    ("train_rm.py", ["--n_heldout", "0"], "--n_heldout must be >= 1"),
    ("train_rm.py", ["--resume"], "--resume: "),
    ("train_ppo.py", ["--resume"], "--resume: "),
    ("train_sft.py", ["--n_head", "3", "--n_embd", "128"], "must be a multiple of --n_head 3"),
    ("train_sft.py", ["--n_head", "1", "--n_embd", "129"], "--n_embd 129 must be even"),
    ("train_ppo.py", ["--gamma", "0"], "--gamma must be in (0, 1]"),
    ("train_ppo.py", ["--minibatch_size", "64", "--batch_size", "32"], "larger than --batch_size"),
    ("train_sft.py", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("train_sft.py", ["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0, got nan"),
    ("train_sft.py", ["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    ("train_sft.py", ["--train_on", "prompt"], "--train_on must be one of reply, all, not 'prompt'"),
    ("train_rm.py", ["--readout", "max"], "--readout must be one of sum, mean, not 'max'"),
    ("train_ppo.py", ["--lam", "nan"], "--lam must be in [0, 1], got nan"),
    ("train_rm.py", ["--rating_weight", "nan"], "--rating_weight must be a finite number"),
    ("train_ppo.py", ["--no_eos_penalty", "nan"], "--no_eos_penalty must be a finite number"),
    ("train_sft.py", ["--block_size", "4"], "--block_size must be >= 8"),
    ("train_ppo.py", ["--sft_args", "--block_size 32"], "more than half of the context window"),
])
def test_bad_settings_are_one_error_line_before_any_work(tmp_path, capsys, script, args, flag):
    e = run_main_block(script, "--out_dir", str(tmp_path / "out"), "--device", "cpu", *args)
    line = error_line(capsys, e.code)
    assert line.startswith(f"{script}: error: ") and flag in line, line
    assert not (tmp_path / "out" / "sft.pt").exists()


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py", "sample.py", "chat.py"])
def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys, script):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")   # the check runs on every CPU machine
    args = ["--out_dir", str(tmp_path)] if script.startswith("train") else []
    e = run_main_block(script, *args, "--device", "cuda")
    assert "--device cuda: no CUDA GPU is available here" in error_line(capsys, e.code)


@pytest.mark.parametrize("args, what", [
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"), (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"), (["--top_k", "-1"], "--top_k must be >= 0"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
])
def test_sample_py_refuses_bad_knobs_before_loading(capsys, args, what):
    import sample
    with pytest.raises(SystemExit) as e:                                   # no checkpoint is read: exit 2
        sample.main(["--ckpt", "nowhere.pt", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and what in err and "error: " in err


def test_sample_py_refuses_a_reply_longer_than_half_the_checkpoints_context(pipeline, capsys):
    import sample
    assert sample.main(["--ckpt", str(pipeline[0] / "sft.pt"), "--device", "cpu", "--max_new_tokens", "100"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_new_tokens must be" in err and len(err.strip().splitlines()) == 1


def test_resume_takes_the_models_shape_from_the_checkpoint_and_records_what_ran(tmp_path, sft_dir, capsys):
    import train_sft
    d = tmp_path / "out"
    shutil.copytree(sft_dir, d)
    train_sft.main(["--out_dir", str(d), *TINY, "--resume", "--block_size", "16", "--max_iters", "10",
                    "--eval_interval", "2", "--lr", "3e-3", "--min_lr", "3e-3", "--n_samples", "2"])
    out = capsys.readouterr().out
    assert "resume: block_size = 128 from the checkpoint (not 16)" in out
    assert "resume: changed since the checkpoint, applied: " in out and "lr 0.01 -> 0.003" in out
    ck = P.load_checkpoint(str(d / "sft.pt"), made_by="train_sft.py")
    if ck["step"] > 8:                                                         # a better val loss was saved
        assert ck["config"]["block_size"] == ck["model_args"]["block_size"] == 128 and ck["config"]["lr"] == 3e-3


def test_the_same_feedback_file_twice_is_refused(tmp_path, sft_dir, capsys):
    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps(RATING) + "\n")
    shutil.copy(sft_dir / "sft.pt", tmp_path / "sft.pt")
    e = run_main_block("train_rm.py", "--out_dir", str(tmp_path), "--device", "cpu", "--data", f"{fb},{fb}")
    assert "is given twice" in e.code and str(fb) in e.code


# ---- 3. files, folders and checkpoints of the wrong kind ----------------------------------------------------------

def test_out_dir_that_is_a_file_or_read_only_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    e = run_main_block("train_sft.py", "--out_dir", str(a_file), "--device", "cpu")
    assert f"--out_dir {a_file} is a file, not a folder" in error_line(capsys, e.code)
    ro = read_only_dir(tmp_path / "ro")
    try:
        e = run_main_block("train_ppo.py", "--out_dir", str(ro), "--device", "cpu")
        assert f"--out_dir {ro} is not writable" in error_line(capsys, e.code)
    finally:
        writable_again(tmp_path / "ro")


def test_data_or_feedback_naming_a_folder_is_refused(tmp_path, sft_dir, capsys):
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path / "o"), "--device", "cpu", "--feedback", str(tmp_path))
    assert "is a directory, not a JSONL file" in error_line(capsys, e.code)
    shutil.copy(sft_dir / "sft.pt", tmp_path / "sft.pt")
    e = run_main_block("train_rm.py", "--out_dir", str(tmp_path), "--device", "cpu", "--data", str(tmp_path))
    assert "is a directory, not a JSONL file" in e.code


def test_checkpoints_of_the_wrong_kind_are_named(tmp_path, pipeline, capsys):
    import chat
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)
    shutil.copy(d / "ppo.pt", d / "sft.pt")                                    # a ppo.pt where sft.pt should be
    e = run_main_block("train_sft.py", "--out_dir", str(d), *TINY, "--resume")
    assert isinstance(e.code, str) and "is a ppo checkpoint, not the sft checkpoint" in e.code
    shutil.copy(pipeline[0] / "sft.pt", d / "ppo.pt")                          # an sft.pt where ppo.pt should be
    e = run_main_block("train_ppo.py", "--out_dir", str(d), "--resume", "--device", "cpu")
    assert "is a sft checkpoint, not the ppo checkpoint" in e.code or "is a ppo checkpoint" in e.code
    assert chat.main(["--ckpt", str(pipeline[0] / "sft.pt"), "--rm", str(pipeline[0] / "sft.pt")]) == 1
    err = capsys.readouterr().err
    assert f"--rm {pipeline[0] / 'sft.pt'}" in err and "not a reward-model checkpoint" in err


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/rlhf_pwned",))


def test_a_malicious_checkpoint_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "sft.pt"
    torch.save({"model_args": {}, "model": {}, "x": Evil()}, path)
    with pytest.raises(ValueError) as e:
        P.load_checkpoint(str(path), made_by="train_sft.py")
    msg = str(e.value)
    assert "not a checkpoint this project wrote" in msg and "weights_only" not in msg
    assert not os.path.exists("/tmp/rlhf_pwned")


def test_the_feedback_checker_on_missing_empty_and_cut_short_files(tmp_path, capsys):
    from data import feedback
    assert feedback.main([str(tmp_path / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert feedback.main([str(tmp_path / "empty.jsonl")]) == 1
    assert "no feedback records" in capsys.readouterr().err
    (tmp_path / "cut.jsonl").write_text(json.dumps(RATING) + '\n{"kind": "rating", "prompt": "p", "re')
    assert feedback.main([str(tmp_path / "cut.jsonl")]) == 1
    assert "cut.jsonl:2: not valid JSON: the line is cut short" in capsys.readouterr().out


def test_train_rm_reads_bad_data_before_training_anything(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "rating"}\n')
    t0 = time.time()
    e = run_main_block("train_rm.py", "--out_dir", str(tmp_path / "out"), "--device", "cpu", "--data", str(bad))
    assert isinstance(e.code, str) and f"{bad}:1:" in e.code
    assert not (tmp_path / "out" / "sft.pt").exists() and time.time() - t0 < 30   # no SFT run first


# ---- 4. the disk: full, read-only, stale temp files -----------------------------------------------------------------

def test_a_full_disk_is_one_line_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    import errno
    path = tmp_path / "sft.pt"
    P.save_checkpoint({"model_args": {}, "model": {}, "v": 1}, str(path))

    def full(obj, f):                                 # what torch.save raises when the disk fills mid-write
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 64 vs 0")
    monkeypatch.setattr(P.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("usage", (), {"free": 4096})())   # 4 KiB left
    with pytest.raises(OSError) as e:
        P.save_checkpoint({"model_args": {}, "model": {}, "v": 2}, str(path))
    assert e.value.errno == errno.ENOSPC and "no space left on the device" in str(e.value) and str(path) in str(e.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"] == 1 and not (tmp_path / "sft.pt.tmp").exists()


# ---- 5. kill -9 while writing ------------------------------------------------------------------------------------

SAVE_LOOP = r'''
import sys
sys.path.insert(0, sys.argv[1])
import torch
from data.plumbing import load_checkpoint, save_checkpoint
ckpt = load_checkpoint(sys.argv[2], made_by="x", kind=sys.argv[4])
ckpt["pad"] = torch.zeros(3_000_000)                      # 12 MB: the kill lands mid-write often
i = 0
while True:
    ckpt["i"] = i
    save_checkpoint(ckpt, sys.argv[3])
    i += 1
'''


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_kill_9_during_checkpoint_saves_never_leaves_a_broken_file(tmp_path, pipeline, kind):
    script = tmp_path / "loop.py"
    script.write_text(SAVE_LOOP)
    target = tmp_path / f"{kind}.pt"
    rng = random.Random(kind)
    seen = set()
    for trial in range(2):
        p = subprocess.Popen([sys.executable, str(script), ROOT, str(pipeline[0] / f"{kind}.pt"), str(target), kind],
                             env=ENV)
        deadline = time.time() + 120                                          # imports, then saves in a loop:
        while not target.exists() and time.time() < deadline and p.poll() is None:   # a loaded machine is slow
            time.sleep(0.1)
        time.sleep(rng.random())                                              # then a kill at a random moment
        p.send_signal(signal.SIGKILL)
        p.wait()
        if target.exists():
            ck = P.load_checkpoint(str(target), made_by="x", kind=kind)       # whole, never half-written
            seen.add(ck["i"])
    assert seen, "the loop never finished a save"
    P.save_checkpoint(P.load_checkpoint(str(target), made_by="x"), str(target))   # the killed one's temp file
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]        # is removed by the next save


APPEND_LOOP = r'''
import sys
sys.path.insert(0, sys.argv[1])
from data.feedback import write_feedback
i = 0
while True:
    write_feedback(sys.argv[2], {"kind": "rating", "prompt": "p" * 20000, "reply": "r", "rating": 3, "i": i})
    i += 1
'''


def test_kill_9_during_feedback_appends_loses_at_most_the_line_being_written(tmp_path):
    script = tmp_path / "append.py"
    script.write_text(APPEND_LOOP)
    fb = tmp_path / "fb.jsonl"
    for trial in range(3):
        p = subprocess.Popen([sys.executable, str(script), ROOT, str(fb)], env=ENV)
        time.sleep(2 + trial * 0.37)
        p.send_signal(signal.SIGKILL)
        p.wait()
        write_feedback(str(fb), {**RATING, "i": -1})                          # the next append heals the file
        recs, n_bad = read_feedback(str(fb))
        assert n_bad == 0
        numbers = [r["meta"]["i"] for r in recs]
        assert numbers[-1] == -1 and numbers.count(-1) == trial + 1


# ---- found by the second sweep --------------------------------------------------------------------------------

def test_a_fresh_sft_run_that_diverges_keeps_the_good_checkpoint_it_found(tmp_path, sft_dir):
    d = tmp_path / "out"
    shutil.copytree(sft_dir, d)
    before = (d / "sft.pt").read_bytes()
    e = run_main_block("train_sft.py", "--out_dir", str(d), *TINY, "--lr", "1e6", "--max_iters", "4",
                       "--eval_interval", "1", "--warmup_iters", "1", "--overwrite")
    assert isinstance(e.code, str) and "diverged" in e.code and "kept as it was" in e.code, e.code
    assert (d / "sft.pt").read_bytes() == before                    # weights of 1e4 and more are never saved


def test_a_diverging_reward_model_never_replaces_rm_pt(tmp_path, pipeline):
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)
    before = (d / "rm.pt").read_bytes()
    e = run_main_block("train_rm.py", "--out_dir", str(d), *TINY_RM.split(), "--lr", "1e6", "--warmup_iters", "1")
    assert isinstance(e.code, str) and ("diverged" in e.code or "loss is" in e.code), e.code
    assert f"The last good checkpoint is {d / 'rm.pt'}" in e.code
    assert (d / "rm.pt").read_bytes() == before


def test_a_context_longer_than_the_text_is_one_line(tmp_path):
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path), *TINY, "--block_size", "100000", "--n_embd", "8",
                       "--max_iters", "1")
    assert isinstance(e.code, str) and "--block_size 100000 is longer than the" in e.code, e.code


def test_train_rm_refuses_a_wrong_rm_pt_before_sampling(tmp_path, sft_dir):
    shutil.copy(sft_dir / "sft.pt", tmp_path / "sft.pt")
    shutil.copy(sft_dir / "sft.pt", tmp_path / "rm.pt")
    e = run_main_block("train_rm.py", "--out_dir", str(tmp_path), *TINY_RM.split(), "--resume")
    assert isinstance(e.code, str) and "is a sft checkpoint, not the rm checkpoint" in e.code, e.code
    assert not (tmp_path / "panel_labels.jsonl").exists()


def test_ppo_refuses_a_reward_model_that_reads_less_than_the_policy_writes(tmp_path, pipeline):
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)
    os.remove(d / "ppo.pt")
    rm = torch.load(d / "rm.pt", weights_only=True)
    rm["model_args"]["block_size"] = 64                                        # the sft.pt reads 128
    rm["model"]["wpe.pe"] = rm["model"]["wpe.pe"][:64]                         # its position table, as saved
    torch.save(rm, d / "rm.pt")
    e = run_main_block("train_ppo.py", "--out_dir", str(d), *TINY_PPO)
    assert isinstance(e.code, str) and "rm.pt reads 64 tokens" in e.code and "writes 128" in e.code, e.code


def test_held_out_ratings_have_no_label_accuracy_and_say_so(tmp_path, sft_dir, capsys):
    shutil.copy(sft_dir / "sft.pt", tmp_path / "sft.pt")
    fb = tmp_path / "ratings.jsonl"
    fb.write_text("".join(json.dumps({**RATING, "prompt": f"p{i}", "reply": f"r {i}", "rating": 1 + i % 5}) + "\n"
                          for i in range(40)))
    import train_rm
    ev = train_rm.main(["--out_dir", str(tmp_path), *TINY_RM.split(), "--data", str(fb)])
    out = capsys.readouterr().out
    assert ev["acc"] != ev["acc"]                                              # nan: there is no pair to order
    assert "label acc n/a (the held-out items are ratings: no pairs)" in out and "label acc nan" not in out


def test_a_feedback_line_that_cannot_be_written_leaves_no_half_line(tmp_path, monkeypatch):
    import errno
    fb = tmp_path / "fb.jsonl"
    write_feedback(str(fb), RATING)
    before = fb.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_feedback(str(fb), {**RATING, "prompt": "x" * 5000})
    monkeypatch.undo()
    assert fb.read_bytes() == before                                           # cut back to the whole lines
    write_feedback(str(fb), {**RATING, "rating": 5})
    assert [r["rating"] for r in read_feedback(str(fb))[0]] == [3, 5] and not (tmp_path / "fb.jsonl.partial").exists()


def test_chat_saves_feedback_after_input_that_is_not_utf8(tmp_path, pipeline):
    fb = tmp_path / "fb.jsonl"
    garbage = bytes(range(128, 256)) * 4
    r = subprocess.run([sys.executable, "chat.py", "--ckpt", str(pipeline[0] / "sft.pt"), "--feedback", str(fb),
                        "--max_new_tokens", "8"], input=b"hi " + garbage + b"\n/rate 3\n", capture_output=True,
                       cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"}, timeout=120)   # a strict locale
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    recs, n_bad = read_feedback(str(fb))
    assert n_bad == 0 and len(recs) == 1 and "\ufffd" in recs[0]["prompt"]


def test_inf_is_accepted_where_the_help_says_inf_is_off(tmp_path):
    import train_ppo
    s = P.parse_settings(train_ppo.Settings, train_ppo.PRESETS, ["--out_dir", str(tmp_path), "--device", "cpu",
                         "--clip_eps", "inf", "--vf_clip", "inf", "--score_clip", "inf"], check=train_ppo.problems)
    assert s.clip_eps == s.vf_clip == s.score_clip == float("inf")


def test_a_short_context_trains_to_the_end(tmp_path, monkeypatch):
    import train_sft
    monkeypatch.setattr(train_sft, "plot", lambda history, path: None)
    train_sft.main(["--out_dir", str(tmp_path), *TINY, "--block_size", "32", "--max_iters", "2", "--eval_interval",
                    "2", "--n_samples", "2"])                           # the report's replies fit in 32 tokens
    assert (tmp_path / "sft.pt").exists()


def test_ctrl_c_is_one_line_and_the_checkpoint_stays_whole(tmp_path, sft_dir):
    shutil.copytree(sft_dir, tmp_path / "out")
    p = subprocess.Popen([sys.executable, "train_sft.py", "--out_dir", str(tmp_path / "out"), *TINY, "--resume",
                          "--max_iters", "100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "model:" not in p.stdout.readline():        # training has started
        pass
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted (Ctrl-C)" in err, err[-2000:]
    P.load_checkpoint(str(tmp_path / "out" / "sft.pt"), made_by="x", kind="sft")


# ---- 6. several writers, hand-edited checkpoints, nested flags -----------------------------------------------

TWO_WRITERS = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from data.feedback import write_feedback
while time.time() < float(sys.argv[4]):                  # both writers start at the same moment
    pass
for i in range(60):                                      # big records, so that the appends overlap in time
    write_feedback(sys.argv[2], {"kind": "rating", "prompt": "p" * 200_000, "reply": "r", "rating": 3,
                                 "writer": sys.argv[3], "i": i})
'''


def start_together(tmp_path, code, argsets):
    script = tmp_path / "writer.py"
    script.write_text(code)
    go = str(time.time() + 3)                                       # after both interpreters have started
    return [subprocess.Popen([sys.executable, str(script), ROOT, *args, go], env=ENV) for args in argsets]


def test_two_processes_appending_to_one_feedback_file_lose_nothing(tmp_path):
    fb = tmp_path / "fb.jsonl"
    procs = start_together(tmp_path, TWO_WRITERS, [(str(fb), "a"), (str(fb), "b")])
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    recs, n_bad = read_feedback(str(fb))
    got = sorted((r["meta"]["writer"], r["meta"]["i"]) for r in recs)
    assert n_bad == 0 and got == sorted((w, i) for w in "ab" for i in range(60))     # every record, once
    assert not (tmp_path / "fb.jsonl.partial").exists()                  # no line taken for a crash leftover


TWO_SAVERS = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from data.plumbing import load_checkpoint, save_checkpoint
ckpt = load_checkpoint(sys.argv[2], made_by="x", kind="sft")
ckpt["pad"] = torch.zeros(1_000_000)
while time.time() < float(sys.argv[5]):
    pass
for i in range(25):
    ckpt["i"] = (sys.argv[4], i)
    save_checkpoint(ckpt, sys.argv[3])
'''


def test_two_processes_saving_one_checkpoint_path_never_leave_it_unreadable(tmp_path, sft_dir):
    target = tmp_path / "sft.pt"
    shutil.copy(sft_dir / "sft.pt", target)
    args = [(str(sft_dir / "sft.pt"), str(target), w) for w in "ab"]
    procs = start_together(tmp_path, TWO_SAVERS, args)
    seen = set()
    while any(p.poll() is None for p in procs):                          # a reader loads it all the while
        ck = P.load_checkpoint(str(target), made_by="x", kind="sft")
        seen.add(tuple(ck.get("i", ("start", 0))))
    assert [p.returncode for p in procs] == [0, 0]
    assert len(seen) > 2                                                 # it read many versions, all whole
    assert sorted(os.listdir(tmp_path)) == ["sft.pt", "writer.py"]       # no temp file left behind


def test_a_stale_temp_file_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"rm.pt.{dead.pid}.x1.tmp").write_bytes(os.urandom(1024))   # what kill -9 mid-save leaves
    (tmp_path / "rm.pt.1.x2.tmp").write_bytes(b"pid 1 is alive: its save is in progress")
    P.save_checkpoint({"model_args": {}, "model": {}}, str(tmp_path / "rm.pt"))
    assert sorted(os.listdir(tmp_path)) == ["rm.pt", "rm.pt.1.x2.tmp"]


HOLD = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import data.plumbing as P
P.lock_out_dir(sys.argv[2])
print("locked", flush=True)
time.sleep(600)
'''


def test_a_second_run_in_one_out_dir_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    d = tmp_path / "out"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ROOT, str(d)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    e = run_main_block("train_sft.py", "--out_dir", str(d), *TINY, "--max_iters", "2")
    assert isinstance(e.code, str) and f"--out_dir {d} is in use by" in e.code and f"pid {holder.pid}" in e.code
    holder.send_signal(signal.SIGKILL)                                   # a kill -9 leaves no stale lock
    holder.wait()
    P.lock_out_dir(str(d))
    P.unlock_out_dir()


def test_a_fresh_sft_run_never_replaces_an_existing_checkpoint_without_overwrite(tmp_path, sft_dir, capsys):
    d = tmp_path / "out"
    shutil.copytree(sft_dir, d)
    before = (d / "sft.pt").read_bytes()
    e = run_main_block("train_sft.py", "--out_dir", str(d), *TINY, "--max_iters", "2")
    line = error_line(capsys, e.code)
    assert "already holds sft.pt: --resume continues it, --overwrite replaces it" in line
    assert (d / "sft.pt").read_bytes() == before


def edited(path, change):
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)


EDITS = {   # a hand edit -> what the one line must name
    "sft.pt without optimizer": ("sft", lambda c: c.pop("optimizer"), "it has no 'optimizer'"),
    "sft.pt without rng": ("sft", lambda c: c.pop("rng"), "it has no 'rng'"),
    "model_args a list": ("sft", lambda c: c.update(model_args=[4, 4]), "no 'model_args'/'model' dicts"),
    "n_layer a string": ("sft", lambda c: c["model_args"].update(n_layer="1"), "model_args n_layer = '1'"),
    "a negative n_embd": ("sft", lambda c: c["model_args"].update(n_embd=-32), "model_args n_embd = -32"),
    "model a tensor": ("sft", lambda c: c.update(model=torch.zeros(3)), "no 'model_args'/'model' dicts"),
    "NaN weights": ("sft", lambda c: c["model"]["wte.weight"].fill_(float("nan")), "'wte.weight' is not finite"),
    "a weight of another shape": ("sft", lambda c: c["model"].update({"wte.weight": torch.zeros(2, 2)}),
                                  "'wte.weight' has shape (2, 2)"),
    "rm.pt reward_std inf": ("rm", lambda c: c.update(reward_std=float("inf")), "'reward_std' is inf"),
    "rm.pt reward_mean NaN": ("rm", lambda c: c.update(reward_mean=float("nan")), "'reward_mean' is nan"),
    "rm.pt head a string": ("rm", lambda c: c.update(head="w"), "its 'head' is a str"),
    "ppo.pt without critic": ("ppo", lambda c: c.pop("critic"), "it has no 'critic'"),
    "ppo.pt without kl_coef": ("ppo", lambda c: c.pop("kl_coef"), "it has no 'kl_coef'"),
    "ppo.pt kl_coef a string": ("ppo", lambda c: c.update(kl_coef="0.1"), "its 'kl_coef' is a str"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_hand_edited_checkpoint_is_one_line_naming_the_file_and_the_field(tmp_path, pipeline, case):
    kind, change, what = EDITS[case]
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)
    edited(d / f"{kind}.pt", change)
    script = {"sft": "train_sft.py", "rm": "train_rm.py", "ppo": "train_ppo.py"}[kind]
    args = {"sft": TINY, "rm": TINY_RM.split(), "ppo": TINY_PPO}[kind]
    e = run_main_block(script, "--out_dir", str(d), *args, "--resume")
    assert isinstance(e.code, str) and e.code.startswith("error: ") and str(d / f"{kind}.pt") in e.code, e.code
    assert what in e.code and "\n" not in e.code, e.code


def test_sample_and_chat_refuse_a_checkpoint_with_nan_weights(tmp_path, pipeline, capsys):
    import chat
    path = tmp_path / "sft.pt"
    shutil.copy(pipeline[0] / "sft.pt", path)
    edited(path, lambda c: c["model"]["wte.weight"].fill_(float("nan")))
    assert run_main_block("sample.py", "--ckpt", str(path), "--num_samples", "1").code == 1
    assert "'wte.weight' is not finite" in capsys.readouterr().err
    assert chat.main(["--ckpt", str(path)]) == 1
    assert "'wte.weight' is not finite" in capsys.readouterr().err


def test_a_diverging_run_over_a_corrupt_checkpoint_says_none_is_good(tmp_path):
    (tmp_path / "sft.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    msg = P.last_good(str(tmp_path / "sft.pt"))
    assert msg.startswith("No good checkpoint is left:") and "weights_only" not in msg


def test_ppo_resume_with_another_reward_model_is_refused(tmp_path, pipeline):
    d = tmp_path / "out"
    shutil.copytree(pipeline[0], d)
    edited(d / "rm.pt", lambda c: c.update(reward_mean=c["reward_mean"] + 1.0))        # another rm.pt
    e = run_main_block("train_ppo.py", "--out_dir", str(d), *TINY_PPO, "--resume", "--iters", "4")
    assert isinstance(e.code, str) and "was trained with another rm.pt" in e.code, e.code


def test_sft_resume_with_other_val_batches_re_measures_the_best(tmp_path, sft_dir, capsys):
    d = tmp_path / "out"
    shutil.copytree(sft_dir, d)
    step = torch.load(d / "sft.pt", weights_only=True)["step"]
    import train_sft
    train_sft.main(["--out_dir", str(d), *TINY, "--resume", "--eval_iters", "2", "--max_iters", str(step + 1),
                    "--eval_interval", "1", "--n_samples", "1"])
    assert "resume: the val batches changed" in capsys.readouterr().out


@pytest.mark.parametrize("args, what", [
    (["--sft_args", "--block_s 32"], "--sft_args: unrecognized arguments: --block_s 32"),
    (["--sft_args", "--n_layer 0"], "--sft_args: --n_layer must be >= 1"),
    (["--rm_args", "--k 1"], "--rm_args: --k must be >= 2"),
    (["--sft_args", "--out_dir elsewhere"], "--sft_args: --out_dir is the outer run's own"),
    (["--rm_args", "--sft_args '--max_iters x'"], "--rm_args: --sft_args: argument --max-iters/--max_iters: invalid int value: 'x'"),
])
def test_nested_flags_are_checked_by_their_own_parser_before_any_work(tmp_path, capsys, args, what):
    t0 = time.time()
    e = run_main_block("train_ppo.py", "--out_dir", str(tmp_path / "out"), "--device", "cpu", *args)
    assert what in error_line(capsys, e.code) and time.time() - t0 < 30
    assert not (tmp_path / "out" / "sft.pt").exists()


def test_prefixes_of_flags_are_refused(tmp_path, capsys):
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path), "--block_s", "32")
    assert "unrecognized arguments: --block_s" in error_line(capsys, e.code)


def test_hh_rlhf_jsonl_gz_is_read_as_it_is(tmp_path):
    import gzip
    line = json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, friend.",
                       "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."})
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(((line + "\n") * 3).encode()))
    recs, _ = read_feedback(str(tmp_path / "train.jsonl.gz"))
    assert len(recs) == 3 and recs[0]["replies"] == ["Hello, friend.", "Go away."]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(((line + "\n") * 3).encode())[:-20])
    with pytest.raises(ValueError, match="cut.jsonl.gz.*the gzip file is damaged or cut short"):
        read_feedback(str(tmp_path / "cut.jsonl.gz"))


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py", "sample.py", "chat.py"])
def test_ctrl_c_while_the_imports_load_is_one_line_and_status_130(script):
    p = subprocess.Popen([sys.executable, script, "--device", "cpu"], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)                                                    # torch takes a second or more to load
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C) while starting", err[-2000:]


def limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2 ** 30, 6 * 2 ** 30))          # 6 GiB of address space


@pytest.mark.parametrize("args, what", [
    (["train_sft.py", "--n_embd", "2000000", "--n_head", "1", "--max_iters", "2"], "make the run smaller"),
    (["sample.py", "--num_samples", "50000000"], "fewer --num_samples at once"),
])
def test_out_of_memory_is_one_line_naming_what_to_shrink(tmp_path, pipeline, args, what):
    args = args + (["--out_dir", str(tmp_path)] if args[0] == "train_sft.py" else ["--ckpt", str(pipeline[0] / "sft.pt")])
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       preexec_fn=limited_memory, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().startswith("error: out of memory") and what in r.stderr


def test_a_temperature_too_small_to_divide_by_is_greedy():
    from sample import generate
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    prompts = [[1, 2, 3], [4, 5]]
    tiny = generate(gpt, prompts, 6, temperature=1e-40)[0]
    assert torch.equal(tiny, generate(gpt, prompts, 6, greedy=True)[0])


def test_a_folder_where_a_checkpoint_goes_and_a_wrong_compare_with_are_refused_first(tmp_path, pipeline, capsys):
    d = tmp_path / "out"
    (d / "rm.pt").mkdir(parents=True)
    e = run_main_block("train_ppo.py", "--out_dir", str(d), "--device", "cpu")
    assert "rm.pt is a folder, not the checkpoint file" in error_line(capsys, e.code)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pipeline[0] / "sft.pt", other / "ppo.pt")                      # an sft.pt named ppo.pt
    e = run_main_block("train_ppo.py", "--out_dir", str(tmp_path / "x"), "--device", "cpu", "--compare_with",
                       str(other))
    assert "--compare_with:" in (line := error_line(capsys, e.code)) and "is a sft checkpoint" in line


def test_feedback_is_never_appended_to_a_gzip_file(tmp_path):
    import gzip
    from data.feedback import check_writable
    gz = tmp_path / "hh.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(RATING) + "\n").encode()))
    before = gz.read_bytes()
    with pytest.raises(OSError, match="gzip-compressed"):
        check_writable(str(gz))
    with pytest.raises(OSError, match="gzip-compressed"):
        write_feedback(str(gz), RATING)
    assert gz.read_bytes() == before and len(read_feedback(str(gz))[0]) == 1


def test_train_rm_never_overwrites_a_data_file_with_the_panels_labels(tmp_path, capsys):
    labels = tmp_path / "panel_labels.jsonl"
    labels.write_text(json.dumps(RATING) + "\n")                          # a user's edited copy, say
    e = run_main_block("train_rm.py", "--out_dir", str(tmp_path), "--data", str(labels), "--mix_panel",
                       "--device", "cpu")
    assert "is the file this run writes the panel's labels to" in error_line(capsys, e.code)
    assert labels.read_text() == json.dumps(RATING) + "\n"


# ---- settings declared once: each field's allowed values beside it -------------------------------------------

@pytest.mark.parametrize("value, allowed, why", [
    (1, ">= 1", None), (0, ">= 1", "must be >= 1, got 0"), (1e-9, "> 0", None), (0.0, "> 0", "must be > 0, got 0.0"),
    (math.inf, "> 0", "must be a finite number > 0, got inf"), (math.inf, "(0, inf]", None),
    (math.inf, "(0, inf)", "must be in (0, inf), got inf"), (1.0, "[0, 1)", "must be in [0, 1), got 1.0"),
    (0.0, "[0, 1)", None), (0.0, "(0, 1]", "must be in (0, 1], got 0.0"), (math.nan, "[0, 1]", "must be in [0, 1], got nan"),
    (math.nan, "", "must be a finite number, got nan"), (-2.0, "", None), ("all", "reply | all", None),
    ("some", "reply | all", "must be one of reply, all, not 'some'"), ("x", "", None), (True, "", None),
])
def test_outside_reads_the_allowed_values_as_written(value, allowed, why):
    assert P.outside(value, allowed) == why


SCRIPTS = ("train_sft", "train_rm", "train_ppo", "sample", "chat")
UNBOUNDED = {"no_eos_penalty"}        # a score: any finite number is a value a user may want


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_number_flag_declares_its_range_and_every_field_its_help(name):
    import dataclasses
    import importlib
    settings = importlib.import_module(name).Settings
    for f in dataclasses.fields(settings):
        assert f.metadata.get("help"), f"{name}.Settings.{f.name} has no help"
        if f.type in (int, float) and f.name not in UNBOUNDED:
            assert f.metadata["allowed"], f"{name}.Settings.{f.name} declares no range"
        assert P.outside(f.default, f.metadata["allowed"]) is None, f"{name}: the default of {f.name} is refused"


def test_the_declared_choices_are_the_ones_the_code_knows():
    import dataclasses
    import reward
    import train_rm
    allowed = {f.name: f.metadata["allowed"] for f in dataclasses.fields(train_rm.Settings)}
    assert set(allowed["readout"].split(" | ")) == set(reward.READOUTS)
    for name in ("train_sft", "train_rm", "train_ppo"):
        module = __import__(name)
        presets = {f.name: f.metadata["allowed"] for f in dataclasses.fields(module.Settings)}["preset"]
        assert presets.split(" | ") == ["auto", *module.PRESETS]
