"""Shared test setup: the repo root on sys.path, one torch thread, and the tiny SFT run that the
end-to-end tests of train_sft.py and train_rm.py share (whichever needs it first trains it)."""
import os
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny model for the end-to-end runs; 8 steps at lr 1e-2 take the loss from ~10.8 (ln 50257) to ~9.1.
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "128", "--batch_size", "4",
        "--eval_iters", "1", "--device", "cpu"]
SHARED = TINY + ["--max_iters", "8", "--lr", "1e-2", "--min_lr", "1e-2", "--warmup_iters", "2",
                 "--eval_interval", "4", "--log_interval", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and when other processes share the 2 cores the
    OpenMP workers spin-wait for each other (measured: the model+sample tests 60 s with 2 threads, 11 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def release_out_dirs():
    """A trainer's main() run in this process and stopped by an error keeps its out_dir locked (a script
    would have exited): release it, so that later tests' processes may use the folder."""
    yield
    import data.plumbing as P
    P.unlock_out_dir(everything=True)


def run(*args, timeout=300):
    """Run a script of the repo in a fresh interpreter, one thread, from the repo root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def shared_sft(tmp_path_factory):
    """out_dir of the tiny SFT run shared by the test files (trained by whichever needs it first)."""
    d = tmp_path_factory.getbasetemp() / "tiny_sft"
    if not (d / "stdout.txt").exists():  # written only after a successful run
        d.mkdir(exist_ok=True)
        r = run("train_sft.py", "--out_dir", str(d), *SHARED)
        assert r.returncode == 0, r.stdout + r.stderr
        (d / "stdout.txt").write_text(r.stdout)
    return d


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    return shared_sft(tmp_path_factory)


def run_main_block(script, *args):
    """Run `script` as `python script args` does, but in this process (a new interpreter costs ~5 s of
    imports): its `if __name__ == "__main__":` block included. Returns how it exited (SystemExit)."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = argv
    return e.value


TINY_SFT = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 128 --batch_size 4 --eval_iters 1 --max_iters 6 " \
           "--lr 1e-2 --min_lr 1e-2 --warmup_iters 2 --eval_interval 3 --log_interval 3 --n_samples 4 --device cpu"
TINY_RM = "--n_prompts 16 --n_heldout 6 --k 2 --max_new_tokens 8 --epochs 1 --batch_size 8 --eval_interval 2 --device cpu"
TINY_PPO = ["--iters", "3", "--batch_size", "6", "--minibatch_size", "3", "--ppo_epochs", "2", "--max_new_tokens", "8",
            "--n_eval", "6", "--n_report", "8", "--eval_interval", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The whole pipeline from nothing, as a student runs it (a subprocess, tiny settings), once per test run:
    (out_dir with sft.pt, rm.pt, ppo.pt, ..., the CompletedProcess). Tests that change files work on a copy."""
    d = tmp_path_factory.mktemp("pipeline")
    r = run("train_ppo.py", "--out_dir", str(d), "--sft_args", TINY_SFT, "--rm_args", TINY_RM, *TINY_PPO)
    return d, r

