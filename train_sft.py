"""
Supervised fine-tuning (SFT): train the book's GPT from scratch on Shakespeare's plays cut into dialogue
turns, "\\n\\nHuman: <a speech>\\n\\nAssistant: <the reply to it><|endoftext|>". Writes out/sft.pt, which
train_rm.py, train_ppo.py, sample.py and chat.py read.

    python train_sft.py                     # preset chosen by device (cpu: ~5 min on 2 cores)
    python train_sft.py --preset gpu --max_iters 2000 --lr 6e-4
    python train_sft.py --resume            # continue out/sft.pt exactly where it stopped
    python train_sft.py --help              # every setting, with its comment

The loop, top to bottom: settings -> data -> model -> optimizer -> for each step: learning rate,
gradient-accumulated forward/backward, clip, step, log; every eval_interval: val loss, checkpoint, plot.

What it simplifies: "SFT" and pre-training are one run here (a from-scratch model learns the language
and the dialogue format together); turns are packed into one token stream and training windows are cut
from it at random (a window may start mid-turn, and attention can see the previous turn, as in
nanoGPT); the loss is on reply tokens only unless --train_on all. No distributed training.
"""
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from model import (EOT, GPT, GPTConfig, get_tokenizer, gpt_from_checkpoint, load_checkpoint, lr_at, param_groups,
                   parse_settings, save_checkpoint)
from sample import decode_replies, encode_prompt, generate


@dataclass
class Settings:
    preset: str = "auto"           # auto | cpu | gpu: device-sized defaults (table below); explicit flags win
    out_dir: str = "out"           # where sft.pt, the log and the plot go
    seed: int = 1337               # seeds model init and batch sampling
    # model (stored in the checkpoint as GPTConfig)
    n_layer: int = 4               # transformer blocks
    n_head: int = 4                # attention heads
    n_embd: int = 128              # model width
    block_size: int = 256          # context window in tokens
    dropout: float = 0.0           # dropout probability while training
    # optimisation
    batch_size: int = 16           # sequences per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    max_iters: int = 600           # optimizer steps in total
    lr: float = 2e-3               # peak learning rate (after warmup)
    min_lr: float = 2e-4           # final learning rate of the cosine decay
    warmup_iters: int = 30         # linear warmup steps
    weight_decay: float = 0.1      # AdamW decay on weight matrices (not gains, biases, embeddings)
    beta1: float = 0.9             # AdamW beta1
    beta2: float = 0.95            # AdamW beta2
    grad_clip: float = 1.0         # clip the global gradient norm to this (0 = off)
    train_on: str = "reply"        # reply: loss on reply tokens only (prompt masked) | all: every token
    feedback: str = ""             # comma-separated feedback JSONL: its corrections (chat.py /fix) join the training data
    feedback_copies: int = 20      # copies of each correction in the training stream (a few among ~1.5M tokens)
    # evaluation, logging, checkpointing
    eval_interval: int = 100       # evaluate val loss and save the checkpoint every this many steps
    eval_iters: int = 20           # val batches per evaluation (the same batches every time)
    log_interval: int = 10         # print a progress line every this many steps
    n_samples: int = 64            # replies sampled at the end (val prompts) for the real-word rate
    resume: bool = False           # continue from out_dir/sft.pt (model, optimizer, step, RNG)
    # hardware
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "float32"         # float32 | bfloat16 autocast (fast on CUDA; works on a CPU, slowly)
    compile: bool = False          # torch.compile the model: fused kernels (on in the gpu preset)


# Presets, chosen by device and printed at start. cpu: finishes in ~5 min on 2 cores. gpu: a ~30M-parameter
# model for one H100 (not yet measured on a GPU, see README).
PRESETS = {
    "cpu": dict(batch_size=8, max_iters=280, warmup_iters=20, eval_interval=70, eval_iters=10),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1, batch_size=64, max_iters=3000,
                lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=50,
                dtype="bfloat16", compile=True),
}


def main(argv=None):
    s = parse_settings(Settings, PRESETS, argv, doc=__doc__)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    if s.train_on not in ("reply", "all"):
        sys.exit(f"error: --train_on must be 'reply' or 'all', not {s.train_on!r}")
    print(f"preset: {s.preset} on {device}  (override any setting with --name value; --help lists them)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()))
    torch.manual_seed(s.seed)
    os.makedirs(s.out_dir, exist_ok=True)
    ckpt_path = os.path.join(s.out_dir, "sft.pt")

    # ---- data: token stream + reply mask, cut into random windows --------------------------------------
    from data.prepare import CACHE_DIR, prepare
    prepare()  # builds data/cache/ from the vendored plays the first time (about half a minute)
    data = {split: (np.memmap(os.path.join(CACHE_DIR, f"{split}.bin"), dtype=np.uint16, mode="r"),
                    np.memmap(os.path.join(CACHE_DIR, f"{split}_mask.bin"), dtype=np.uint8, mode="r"))
            for split in ("train", "val")}
    if s.feedback:  # corrections are demonstrations too (§3.2): append them to the training stream
        from model import encode_reply
        from data.feedback import read_feedback, sft_examples
        enc = get_tokenizer()
        examples = sft_examples(read_feedback([f for f in s.feedback.split(",") if f])[0])
        ids, mask = [], []
        for prompt, reply in examples * s.feedback_copies:  # prompt: a transcript ending in "Assistant:"
            p, r = enc.encode_ordinary(prompt), encode_reply(enc, reply)
            ids, mask = ids + p + r, mask + [0] * len(p) + [1] * len(r)
        tokens, reply_mask = data["train"]
        data["train"] = (np.concatenate([tokens, np.array(ids, dtype=np.uint16)]),
                         np.concatenate([reply_mask, np.array(mask, dtype=np.uint8)]))
        print(f"added {len(examples)} corrections x {s.feedback_copies} copies ({len(ids)} tokens) from {s.feedback}")
    batch_gen = torch.Generator().manual_seed(s.seed)

    def get_batch(split, gen):
        tokens, mask = data[split]
        starts = torch.randint(len(tokens) - s.block_size - 1, (s.batch_size,), generator=gen).tolist()
        x = torch.stack([torch.from_numpy(tokens[i:i + s.block_size].astype(np.int64)) for i in starts])          # (B, T)
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + s.block_size].astype(np.int64)) for i in starts])  # (B, T)
        if s.train_on == "all":
            m = torch.ones_like(y, dtype=torch.bool)                                                            # (B, T)
        else:
            m = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + s.block_size].astype(np.bool_)) for i in starts])  # (B, T)
        return x.to(device), y.to(device), m.to(device)

    # ---- model and optimizer (fresh, or resumed from the checkpoint) ------------------------------------
    if s.resume:
        ckpt = load_checkpoint(ckpt_path, made_by="train_sft.py")
        model = gpt_from_checkpoint(ckpt).to(device)
        start_step, best_val = ckpt["step"], ckpt["best_val_loss"]
        print(f"resuming from {ckpt_path} at step {start_step} (best val loss {best_val:.4f})")
    else:
        cfg = GPTConfig(block_size=s.block_size, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, dropout=s.dropout)
        model, start_step, best_val = GPT(cfg).to(device), 0, float("inf")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, config {asdict(model.config)}")
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2),
                                  fused=torch.device(device).type == "cuda")
    if s.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        batch_gen.set_state(ckpt["rng"]["batch"])
    train_model = torch.compile(model) if s.compile else model
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")

    @torch.no_grad()
    def val_loss():
        train_model.eval()
        gen = torch.Generator().manual_seed(0)  # the same val windows every time, so evaluations compare
        losses = []
        for _ in range(s.eval_iters):
            x, y, m = get_batch("val", gen)
            with autocast:
                losses.append(train_model(x, y, m).item())
        train_model.train()
        return sum(losses) / len(losses)

    log_path = os.path.join(s.out_dir, "sft_log.csv")
    history = read_log(log_path) if s.resume else []

    def save(step):
        save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "optimizer": optimizer.state_dict(),
                         "step": step, "best_val_loss": best_val, "config": asdict(s), "kind": "sft",
                         "rng": {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}}, ckpt_path)
        write_log(log_path, history)
        plot(history, os.path.join(s.out_dir, "sft_loss.png"))

    # ---- the loop -----------------------------------------------------------------------------------------
    train_model.train()
    tokens_per_step = s.batch_size * s.grad_accum * s.block_size
    t0, t_log, loss_sum, n_sum = time.time(), time.time(), 0.0, 0  # n_sum: steps in loss_sum since the last log
    for step in range(start_step, s.max_iters):
        lr = lr_at(step, s.lr, s.min_lr, s.warmup_iters, s.max_iters)   # warmup, then cosine decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(s.grad_accum):
            x, y, m = get_batch("train", batch_gen)                                # (B, T) each
            with autocast:
                loss = train_model(x, y, m) / s.grad_accum
            loss.backward()
            loss_sum += loss.item()
        n_sum += 1
        if not math.isfinite(loss_sum):
            sys.exit(f"error: training loss is {loss_sum} at step {step}; lower --lr or check the data. "
                     f"The last good checkpoint is {ckpt_path} (if one was saved).")
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % s.log_interval == 0 or done == s.max_iters:
            dt = time.time() - t_log
            n = n_sum  # not log_interval: a resumed run's first log covers fewer steps
            eta = (time.time() - t0) / (done - start_step) * (s.max_iters - done)
            print(f"step {done:5d}/{s.max_iters} | loss {loss_sum / n:.4f} | lr {lr:.2e} | "
                  f"{n * tokens_per_step / dt:,.0f} tok/s | ETA {eta / 60:.1f} min", flush=True)
            history.append({"step": done, "train_loss": loss_sum / n, "val_loss": "", "lr": lr})
            t_log, loss_sum, n_sum = time.time(), 0.0, 0
        if done % s.eval_interval == 0 or done == s.max_iters:
            vl = val_loss()
            best_val = min(best_val, vl)
            history.append({"step": done, "train_loss": "", "val_loss": vl, "lr": lr})
            save(done)
            print(f"step {done:5d} | val loss {vl:.4f} | val perplexity {math.exp(vl):.1f} | "
                  f"best {best_val:.4f} | saved {ckpt_path} | {(time.time() - t0) / 60:.1f} min", flush=True)
    # ---- what a student can judge: held-out bits per character, real words, samples ------------------------
    from data.prepare import load_turns, real_word_rate
    enc = get_tokenizer()
    val_turns = load_turns("val")
    with autocast:
        bpc = bits_per_char(model, enc, val_turns, device)
        prompts = [t["prompt"] for t in val_turns[::max(1, len(val_turns) // s.n_samples)]][:s.n_samples]
        seq, _, resp_mask = generate(model, [encode_prompt(enc, p) for p in prompts], 48, temperature=1.0,
                                     generator=torch.Generator(device).manual_seed(s.seed))
    replies = decode_replies(enc, seq, resp_mask)
    rate = real_word_rate(replies)
    print(f"done in {(time.time() - t0) / 60:.1f} min: best val loss {best_val:.4f} (perplexity "
          f"{math.exp(best_val):.1f}); held-out {bpc:.3f} bits per character over {len(val_turns)} val turns; "
          f"real-word rate {rate:.3f} of {len(replies)} sampled replies (temperature 1)")
    for p, r in list(zip(prompts, replies))[:3]:
        print(f"  Human: {p}\n    Bard: {r}")
    print(f"checkpoint {ckpt_path}, plot {os.path.join(s.out_dir, 'sft_loss.png')}")
    return {"best_val_loss": best_val, "bits_per_char": bpc, "real_word_rate": rate}


@torch.no_grad()
def bits_per_char(model, enc, turns, device, batch=64):
    """Held-out loss per character: the nats of predicting each turn's reply tokens (its <|endoftext|>
    included), given its prompt, summed over the turns, in bits, divided by the characters of the reply texts.
    Per character, not per token, so that models with different tokenizers are compared on the same text:
    a tokenizer with longer tokens has fewer, harder tokens, and its loss per token is not comparable."""
    from data.prepare import encode_turn
    was_training = model.training
    model.eval()
    bits, chars = 0.0, 0
    for i in range(0, len(turns), batch):
        rows = [encode_turn(enc, t["prompt"], t["reply"]) for t in turns[i:i + batch]]
        rows = [(ids[-model.config.block_size - 1:], mask[-model.config.block_size - 1:]) for ids, mask in rows]
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), T), EOT, dtype=torch.long)                     # (B, T) right-padded inputs
        y = torch.full((len(rows), T), EOT, dtype=torch.long)                     # (B, T) next tokens
        m = torch.zeros((len(rows), T), dtype=torch.bool)                         # (B, T) reply targets
        for j, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[j, :n], y[j, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
            m[j, :n] = torch.tensor(mask[1:], dtype=torch.bool)
        loss = model(x.to(device), y.to(device), m.to(device))                    # mean nats per reply token
        bits += loss.item() * m.sum().item() / math.log(2)
        chars += sum(len(" " + t["reply"]) for t in turns[i:i + batch])
    model.train(was_training)
    return bits / chars


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else "") for k, v in row.items()} for row in csv.DictReader(f)]


def write_log(path, history):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "lr"])
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(h["step"], h["train_loss"]) for h in history if h["train_loss"] != ""]
    val = [(h["step"], h["val_loss"]) for h in history if h["val_loss"] != ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (reply tokens)")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (held-out plays)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("SFT on Shakespeare dialogue")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # expected errors (missing checkpoint or data): no traceback
        sys.exit(f"error: {e}")
