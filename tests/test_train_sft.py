"""End-to-end tests of train_sft.py (and sample.py on what it writes), on a tiny model.

The shared training run is a real subprocess (`python train_sft.py ...`). The other runs call
train_sft.main(argv), or run the script's `__main__` block with runpy (the error exits, sample.py), in
this process: a new interpreter costs ~5 s of imports (torch, and torch._dynamo via the optimizer), and
the two test files must stay under a minute on 2 shared cores. One tiny sft.pt, trained once per session
under pytest's temp dir, is shared with test_train_rm.py.
"""
import csv
import math
import os
import re
import runpy
import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import ROOT, SHARED, TINY, run, run_main_block, shared_sft, sft_dir  # noqa: F401
import torch

import train_sft
from data.plumbing import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model every test uses; --device cpu also picks the cpu preset, so a GPU machine runs the same.
# The shared run (the same flags in test_train_rm.py): 8 steps at a constant lr of 1e-2 after a 2-step
# warmup take the loss from ~10.8 (= ln 50257, random init) to ~9.1.






@pytest.fixture
def no_plot(monkeypatch):
    """In-process runs skip the matplotlib plot (~0.5 s a checkpoint); the subprocess run draws its own."""
    monkeypatch.setattr(train_sft, "plot", lambda history, path: None)




def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flat(text):
    """Text without any whitespace: argparse re-wraps help lines (and may break at hyphens)."""
    return "".join(text.split())


# ---- the shared run: outputs, checkpoint contents, the loss falls -------------------------------------------

def test_run_writes_checkpoint_log_and_plot(sft_dir):
    for name in ("sft.pt", "sft_log.csv", "sft_loss.png"):
        assert (sft_dir / name).stat().st_size > 0, name
    ckpt = load_checkpoint(str(sft_dir / "sft.pt"), made_by="train_sft.py")
    for key in ("model", "model_args", "optimizer", "step", "best_val_loss", "config", "kind", "rng"):
        assert key in ckpt, key
    assert ckpt["kind"] == "sft" and ckpt["step"] == 8
    assert ckpt["model_args"]["n_layer"] == 1 and ckpt["model_args"]["n_embd"] == 32
    assert ckpt["model_args"]["block_size"] == 128
    assert ckpt["config"]["max_iters"] == 8 and ckpt["config"]["lr"] == 1e-2
    assert ckpt["optimizer"]["state"], "optimizer state (Adam moments) must be saved for --resume"
    rows = read_csv(sft_dir / "sft_log.csv")
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert [int(float(r["step"])) for r in rows if r["val_loss"]] == [4, 8]
    assert math.isfinite(ckpt["best_val_loss"]) and ckpt["best_val_loss"] == pytest.approx(min(val))
    out = (sft_dir / "stdout.txt").read_text()
    assert "preset: cpu" in out and re.search(r"done in .* min: best val loss .* bits per character .* real-word rate", out)


def test_training_loss_goes_down(sft_dir):
    rows = read_csv(sft_dir / "sft_log.csv")
    train = [(int(float(r["step"])), float(r["train_loss"])) for r in rows if r["train_loss"]]
    assert [s for s, _ in train] == [2, 4, 6, 8]  # one row per log_interval
    first, last = train[0][1], train[-1][1]
    # random init: ~ln(8192) = 9.0 (measured ~9.0 over the first two steps), ~8.3 after 8 steps.
    assert 8.5 < first < 9.5
    assert last < first - 0.6, train
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert val[1] < val[0]


# ---- command line ------------------------------------------------------------------------------------------

def test_help_lists_every_setting_with_its_help_and_allowed_values(capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    out = flat(text)
    for f in fields(train_sft.Settings):
        assert f"--{f.name}" in text, f.name
        assert f.metadata["help"] and flat(f.metadata["help"]) in out, f.name
        if f.metadata["allowed"]:
            assert flat(f"allowed: {f.metadata['allowed']}") in out, f.name
    for comment in ("optimizer steps in total", "peak learning rate (after warmup)",
                    "reply: loss on reply tokens only (prompt masked); all: on every token",
                    "continue from out_dir/sft.pt (model, optimizer, step, RNG)", "allowed: [0, 1)"):
        assert flat(comment) in out, comment
    assert flat("python train_sft.py --resume") in out  # the module docstring is the description


# ---- --resume continues exactly ------------------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path, capsys, no_plot):
    a, b = tmp_path / "a", tmp_path / "b"
    # a: 4 steps straight; b: 2 steps, then --resume to 4. warmup_iters > 4: the same lr whatever max_iters is
    # (a evaluates only at the end: evaluations use their own generator and must not change the training)
    common = TINY + ["--lr", "3e-3", "--warmup_iters", "10"]
    train_sft.main(common + ["--out_dir", str(a), "--max_iters", "4", "--log_interval", "1", "--eval_interval", "4"])
    train_sft.main(common + ["--out_dir", str(b), "--max_iters", "2", "--log_interval", "3", "--eval_interval", "2"])
    assert load_checkpoint(str(b / "sft.pt"), made_by="train_sft.py")["step"] == 2
    capsys.readouterr()
    train_sft.main(common + ["--out_dir", str(b), "--max_iters", "4", "--log_interval", "3", "--eval_interval", "2",
                             "--resume"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 2" in out
    assert re.findall(r"step\s+(\d)/4", out) == ["3", "4"], "a resumed run starts at step 3 of 4"

    ca = load_checkpoint(str(a / "sft.pt"), made_by="train_sft.py")
    cb = load_checkpoint(str(b / "sft.pt"), made_by="train_sft.py")
    assert ca["step"] == cb["step"] == 4
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.allclose(ca["model"][k], cb["model"][k], rtol=0, atol=1e-7), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=0)

    # the log: b keeps its step-2 rows, and a resumed row averages only the steps since the resume
    val_a = [float(r["val_loss"]) for r in read_csv(a / "sft_log.csv") if r["val_loss"]]
    la = {int(float(r["step"])): float(r["train_loss"]) for r in read_csv(a / "sft_log.csv") if r["train_loss"]}
    rows_b = read_csv(b / "sft_log.csv")
    lb = {int(float(r["step"])): float(r["train_loss"]) for r in rows_b if r["train_loss"]}
    assert sorted(lb) == [2, 3, 4]
    assert lb[2] == pytest.approx((la[1] + la[2]) / 2, rel=1e-5)
    assert lb[3] == pytest.approx(la[3], rel=1e-5)  # one step since the resume, not log_interval=3
    assert lb[4] == pytest.approx(la[4], rel=1e-5)
    assert [int(float(r["step"])) for r in rows_b if r["val_loss"]] == [2, 4]
    assert float(rows_b[-1]["val_loss"]) == pytest.approx(val_a[-1], rel=1e-6)  # the same model at step 4


# ---- errors ---------------------------------------------------------------------------------------------------

# A SystemExit whose code is a string: Python prints it to stderr, without a traceback, and exits with 1.

def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path / "empty"), *TINY, "--resume")
    err = capsys.readouterr().err.splitlines()[-1]                            # argparse: usage, then one line
    assert e.code == 2 and err.startswith("train_sft.py: error: --resume: ")
    assert str(tmp_path / "empty" / "sft.pt") + " does not exist" in err


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    # no data cache and no vendored plays to build it from: the script stops and names the file
    import data.prepare as prep
    monkeypatch.setattr(prep, "TARBALL", str(tmp_path / "shakespeare.tar.xz"))
    monkeypatch.setattr(prep, "CACHE_DIR", str(tmp_path / "cache"))
    e = run_main_block("train_sft.py", "--out_dir", str(tmp_path / "out"), *TINY)
    assert isinstance(e.code, str) and e.code.startswith("error: ")
    assert str(tmp_path / "shakespeare.tar.xz") + " is missing" in e.code
    assert not (tmp_path / "out" / "sft.pt").exists()


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys, no_plot):
    # lr 1e30: the first AdamW step blows the weights up, the next loss is nan/inf
    with pytest.raises(FloatingPointError) as e:                            # `python train_sft.py`: "error: ..."
        train_sft.main(TINY + ["--out_dir", str(tmp_path), "--max_iters", "5", "--lr", "1e30",
                               "--warmup_iters", "1", "--eval_interval", "100"])
    msg = str(e.value)
    assert msg.startswith("training loss is") and ("nan" in msg or "inf" in msg), msg
    assert "lower --lr" in msg and "No checkpoint was written" in msg
    assert not (tmp_path / "sft.pt").exists()  # never saved a non-finite model


def test_train_on_all_tokens(tmp_path, capsys, no_plot):
    # one step: with every token under the loss a step costs twice a reply-only step (the vocab projection)
    train_sft.main(TINY + ["--out_dir", str(tmp_path), "--max_iters", "1", "--eval_interval", "1",
                           "--log_interval", "1", "--train_on", "all"])
    ckpt = load_checkpoint(str(tmp_path / "sft.pt"), made_by="train_sft.py")
    assert ckpt["config"]["train_on"] == "all" and ckpt["step"] == 1
    (row,) = [r for r in read_csv(tmp_path / "sft_log.csv") if r["train_loss"]]
    assert math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 5


def test_bf16_and_compile_paths_train_like_float32(tmp_path, capsys, no_plot, monkeypatch):
    # The gpu preset's code paths (--dtype bfloat16: autocast; --compile: torch.compile(model)) run on a CPU
    # too. torch.compile here uses dynamo's "eager" backend: the same graph capture (and the graph break at
    # the loss mask) as on a GPU, without generating kernels, which would take minutes on 2 cores.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    runs = {}
    for name, extra in (("fp32", []), ("bf16_compiled", ["--dtype", "bfloat16", "--compile", "true"])):
        train_sft.main(TINY + ["--out_dir", str(tmp_path / name), "--max_iters", "3", "--eval_interval", "3",
                               "--log_interval", "1", "--lr", "1e-2", "--warmup_iters", "1"] + extra)
        rows = [r for r in read_csv(tmp_path / name / "sft_log.csv") if r["train_loss"]]
        runs[name] = ([float(r["train_loss"]) for r in rows],
                      load_checkpoint(str(tmp_path / name / "sft.pt"), made_by="train_sft.py"))
    (loss32, ck32), (loss16, ck16) = runs["fp32"], runs["bf16_compiled"]
    assert ck16["config"]["dtype"] == "bfloat16" and ck16["config"]["compile"] is True
    assert ck16["model"].keys() == ck32["model"].keys()                       # no "_orig_mod." prefixes
    assert all(v.dtype == torch.float32 for v in ck16["model"].values())      # weights stay float32
    assert len(loss16) == len(loss32) == 3 and loss16 != loss32                 # autocast did run in bf16
    for a, b in zip(loss16, loss32):                                          # bf16 rounding, not a new model
        assert math.isfinite(a) and abs(a - b) < 0.05 * b, (loss16, loss32)
    torch._dynamo.reset()


def test_unknown_dtype_is_a_clear_error(tmp_path, capsys):
    e = run_main_block("train_sft.py", *TINY, "--out_dir", str(tmp_path), "--dtype", "float16")
    assert e.code == 2 and "--dtype must be one of float32, bfloat16, not 'float16'" in capsys.readouterr().err


# ---- sample.py on the trained checkpoint ------------------------------------------------------------------------

def run_sample(*args):
    """`python sample.py args`, in this process (runpy, as in run_main_block); it prints to stdout."""
    argv = sys.argv
    sys.argv = ["sample.py", *args]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
        assert e.value.code == 0
    finally:
        sys.argv = argv


def test_sample_from_the_trained_checkpoint(sft_dir, capsys):
    args = ["--ckpt", str(sft_dir / "sft.pt"), "--prompt", "Good morrow", "--max-new-tokens", "8",
            "--num-samples", "2", "--device", "cpu", "--seed"]
    run_sample(*args, "1")
    first = capsys.readouterr().out
    samples = re.split(r"-+ sample \d/2 -+\n", first)[1:]
    assert len(samples) == 2
    for s in samples:
        assert "Human: Good morrow" in s and "Assistant:" in s
        assert len(s.split("Assistant:", 1)[1].strip()) > 0  # a reply was generated
    run_sample(*args, "1")  # the same seed: the same text
    assert capsys.readouterr().out == first
    run_sample(*args, "2")
    assert capsys.readouterr().out != first


def test_corrections_from_feedback_join_the_training_stream(tmp_path, capsys, no_plot):
    # a correction (chat.py /fix) is also a demonstration: --feedback appends it to the SFT training stream
    fixture = os.path.join(ROOT, "tests", "fixtures", "feedback_all_kinds.jsonl")
    train_sft.main(TINY + ["--out_dir", str(tmp_path), "--max_iters", "1", "--eval_interval", "1",
                           "--feedback", fixture, "--feedback_copies", "3"])
    out = capsys.readouterr().out
    assert "added 1 corrections x 3 copies" in out
    assert load_checkpoint(str(tmp_path / "sft.pt"), made_by="train_sft.py")["config"]["feedback"] == fixture
