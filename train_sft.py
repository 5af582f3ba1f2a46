"""
Supervised fine-tuning (SFT): train the book's GPT from scratch on Shakespeare's plays cut into dialogue
turns, "\\n\\nHuman: <a speech>\\n\\nAssistant: <the reply to it><|endoftext|>". Writes out/sft.pt, which
train_rm.py, train_ppo.py, sample.py and chat.py read.

    python train_sft.py                     # preset chosen by device (cpu: ~4.5 min on 2 cores)
    python train_sft.py --preset gpu --max_iters 2000 --lr 6e-4
    python train_sft.py --resume            # continue out/sft.pt from its step (the best val loss so far)
    python train_sft.py --help              # every setting: its default, allowed values and help
    torchrun --standalone --nproc_per_node=2 train_sft.py --grad_accum 2 --batch_size 4   # 2 processes

The loop: settings -> data -> model -> optimizer -> each step: learning rate, gradient-accumulated
forward/backward, clip, step, log; every eval_interval: val loss, checkpoint (only a better one), plot.

What it simplifies: "SFT" and pre-training are one run here (a from-scratch model learns the language
and the dialogue format together); turns are packed into one token stream and training windows are cut
from it at random (a window may start mid-turn, and attention can see the previous turn, as in nanoGPT);
the loss is on reply tokens only unless --train_on all.
"""
if __name__ == "__main__":    # Ctrl-C while the imports below load (a second or two): one line, status 130
    import os
    import signal
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted (Ctrl-C) while starting\n"),
                                             os._exit(130)))
import contextlib
import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from model import GPT, GPTConfig, clip_and_step, gpt_from_checkpoint, lr_at, param_groups
from data.prepare import EOT, encode_turn, get_tokenizer, load_turns, real_word_rate
from data.plumbing import (all_sum, barrier, end_world, flag, last_good, load_checkpoint, pyplot, run_script,
                           save_checkpoint, save_figure, start_run, weights_problem, write_text)
from sample import decode_replies, encode_prompt, generate


@dataclass
class Settings:
    preset: str = flag("auto", "auto | cpu | gpu", "device-sized defaults (table below); explicit flags win")
    out_dir: str = flag("out", "", "where sft.pt, the log and the plot go")
    seed: int = flag(1337, ">= 0", "seeds model init and batch sampling")
    # model (stored in the checkpoint as GPTConfig)
    n_layer: int = flag(4, ">= 1", "transformer blocks")
    n_head: int = flag(4, ">= 1", "attention heads")
    n_embd: int = flag(128, ">= 1", "model width")
    block_size: int = flag(256, ">= 8", "context window in tokens")
    dropout: float = flag(0.0, "[0, 1)", "dropout probability while training")
    # optimisation
    batch_size: int = flag(16, ">= 1", "sequences per micro-batch")
    grad_accum: int = flag(1, ">= 1",
                           "micro-batches per optimizer step (effective batch = batch_size * grad_accum)")
    max_iters: int = flag(600, ">= 1", "optimizer steps in total")
    lr: float = flag(2e-3, "> 0", "peak learning rate (after warmup)")
    min_lr: float = flag(2e-4, ">= 0", "final learning rate of the cosine decay")
    warmup_iters: int = flag(30, ">= 0", "linear warmup steps")
    weight_decay: float = flag(0.1, ">= 0", "AdamW decay on weight matrices (not gains, biases, embeddings)")
    beta1: float = flag(0.9, "[0, 1)", "AdamW beta1")
    beta2: float = flag(0.95, "[0, 1)", "AdamW beta2")
    grad_clip: float = flag(1.0, ">= 0", "clip the global gradient norm to this (0 = off)")
    train_on: str = flag("reply", "reply | all",
                         "reply: loss on reply tokens only (prompt masked); all: on every token")
    feedback: str = flag("", "", "feedback JSONL files, comma-separated: corrections join the training data")
    feedback_copies: int = flag(20, ">= 1",
                                "copies of each correction in the training stream (a few among ~1.5M tokens)")
    # evaluation, logging, checkpointing
    eval_interval: int = flag(100, ">= 1", "evaluate val loss and save the checkpoint every this many steps")
    eval_iters: int = flag(20, ">= 1", "val batches per evaluation (the same batches every time)")
    log_interval: int = flag(10, ">= 1", "print a progress line every this many steps")
    n_samples: int = flag(64, ">= 1", "replies sampled at the end (val prompts) for the real-word rate")
    resume: bool = flag(False, "", "continue from out_dir/sft.pt (model, optimizer, step, RNG)")
    overwrite: bool = flag(False, "",
                           "start afresh though out_dir holds an sft.pt (replaced at the first save)")
    # hardware
    device: str = flag("auto", "", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("float32", "float32 | bfloat16", "autocast dtype (fast on CUDA; slow on a CPU)")
    compile: bool = flag(False, "", "torch.compile the model: fused kernels (on in the gpu preset)")


# cpu: ~4.5 min on 2 cores (README: measured). gpu: on paper: with the 8,192-id vocabulary the embedding is
# 4M parameters, so the ~30M of the old gpu preset go to the blocks instead: 8 layers of d=512.
PRESETS = {
    "cpu": dict(batch_size=8, max_iters=1500, warmup_iters=20, eval_interval=250, eval_iters=10),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=256, dropout=0.2, batch_size=64, max_iters=2000,
                lr=6e-4, min_lr=6e-5, warmup_iters=100, eval_interval=250, eval_iters=50,
                dtype="bfloat16", compile=True),
}
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "dropout")   # a checkpoint's own: --resume keeps them
VAL_BATCHES = ("eval_iters", "batch_size", "block_size", "dtype")   # what the val loss is measured on


def problems(s):
    """The rules that tie settings together (each field's own range is in Settings); each names its flag."""
    out = []
    if s.n_head >= 1 and s.n_embd % s.n_head:
        out.append(f"--n_embd {s.n_embd} must be a multiple of --n_head {s.n_head} (each head gets "
                   "n_embd / n_head dimensions)")
    if s.n_embd % 2:
        out.append(f"--n_embd {s.n_embd} must be even (the positions' sin and cos come in pairs)")
    if s.min_lr > s.lr:
        out.append(f"--min_lr must be at most --lr, got {s.min_lr} > {s.lr}")
    ckpt = os.path.join(s.out_dir, "sft.pt")
    if s.resume and not os.path.exists(ckpt):
        out.append(f"--resume: {ckpt} does not exist (run without --resume to start one)")
    elif os.path.exists(ckpt) and not (s.resume or s.overwrite):                   # it never gets worse
        out.append(f"--out_dir {s.out_dir} already holds sft.pt: --resume continues it, --overwrite "
                   "replaces it with this fresh run, or give another --out_dir")
    if s.feedback:
        from data.feedback import check_paths
        try:
            check_paths(s.feedback.split(","))
        except (OSError, ValueError) as e:
            out.append(f"--feedback: {e}")
    return out


def main(argv=None):
    s, w, device = start_run(Settings, PRESETS, argv, __doc__, problems)    # w: this process (torchrun)
    s = per_process(s, w)                                # torchrun: grad_accum a multiple of the processes
    torch.manual_seed(s.seed)
    ckpt_path, log_path = os.path.join(s.out_dir, "sft.pt"), os.path.join(s.out_dir, "sft_log.csv")
    data = load_data(s)                                                       # token streams + reply masks
    model, optimizer, batch_gen, start_step, best_val = new_or_resumed(s, device, ckpt_path)
    check_fits(model, data)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, config {asdict(model.config)}")
    eval_model = torch.compile(model) if s.compile else model                  # what evaluations run
    train_model = w.wrap(eval_model)                             # torchrun: DDP averages the gradients
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")
    history = [h for h in read_log(log_path) if h["step"] <= start_step] if s.resume else []
    if best_val is None:          # --resume with other val batches: the best so far re-measured on today's
        best_val = remeasured(s, w, eval_model, data["val"], device, autocast, ckpt_path)
    if w.size > 1:
        torch.manual_seed(s.seed + 1000 * w.rank)    # dropout: each process its own masks (DDP syncs weights)
    # ---- the loop -----------------------------------------------------------------------------------------
    train_model.train()
    tokens_per_step = s.batch_size * s.grad_accum * s.block_size
    my_micro_steps = range(w.rank, s.grad_accum, w.size)      # this process's micro-batches of every step
    t0, t_log, loss_sum, n_sum = time.time(), time.time(), 0.0, 0  # n_sum: steps in loss_sum since last log
    for step in range(start_step, s.max_iters):
        lr = lr_at(step, s.lr, s.min_lr, s.warmup_iters, s.max_iters)   # warmup, then cosine decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum += train_step(s, w, train_model, data["train"], batch_gen, device, autocast, my_micro_steps)
        n_sum += 1
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is {loss_sum} at step {step + 1}; lower --lr or check "
                                     f"the data. {last_good(ckpt_path)}")
        clip_and_step(optimizer, model.parameters(), s.grad_clip)
        done = step + 1
        if done % s.log_interval == 0 or done == s.max_iters:
            dt, n = time.time() - t_log, n_sum   # n, not log_interval: a resumed run's first log has fewer
            eta = (time.time() - t0) / (done - start_step) * (s.max_iters - done)
            print(f"step {done:5d}/{s.max_iters} | loss {loss_sum / n:.4f} | lr {lr:.2e} | "
                  f"{n * tokens_per_step / dt:,.0f} tok/s | ETA {eta / 60:.1f} min", flush=True)
            history.append({"step": done, "train_loss": loss_sum / n, "val_loss": "", "lr": lr})
            t_log, loss_sum, n_sum = time.time(), 0.0, 0
        if done % s.eval_interval == 0 or done == s.max_iters:
            vl = val_loss(s, eval_model, data["val"], device, autocast, w)
            history.append({"step": done, "train_loss": "", "val_loss": vl, "lr": lr})
            if w.main:
                write_log(log_path, history)
                plot(history, os.path.join(s.out_dir, "sft_loss.png"))
            refuse_diverged(model, vl, done, ckpt_path)      # never saved: a run that diverged stops here
            saved = vl < best_val   # the checkpoint never gets worse: only a new best val loss replaces it
            if saved:
                best_val = vl
                save(s, w, model, optimizer, batch_gen, done, best_val, ckpt_path)
            print(f"step {done:5d} | val loss {vl:.4f} | val perplexity {math.exp(min(vl, 50)):.1f} | best "
                  f"{best_val:.4f} | {('saved ' if saved else 'not better: kept ') + ckpt_path} | "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
    barrier()                                                                 # the checkpoint is on disk
    model.load_state_dict(load_checkpoint(ckpt_path, made_by="train_sft.py", kind="sft")["model"])  # the best
    rep = report(s, model, device, autocast, best_val, t0, ckpt_path) if w.main else None
    end_world()
    return rep


def per_process(s, w):
    """Under torchrun each process takes grad_accum / N of a step's micro-batches: grad_accum is rounded up
    to a multiple of the N processes (printed), so the default --grad_accum 1 works with any N."""
    if s.grad_accum % w.size == 0:
        return s
    s = replace(s, grad_accum=-(-s.grad_accum // w.size) * w.size)
    print(f"grad_accum rounded up to {s.grad_accum}, a multiple of the {w.size} processes: each step is "
          f"{s.grad_accum} x {s.batch_size} sequences")
    return s


def train_step(s, w, train_model, train_data, batch_gen, device, autocast, my_micro_steps):
    """Forward and backward over this process's share of a step's grad_accum micro-batches; the global batch's
    mean loss. Every process draws every window (the batch one process would see); DDP syncs at the last."""
    step_loss = torch.zeros((), device=device)
    for k in range(s.grad_accum):
        starts = draw_windows(s, train_data, batch_gen)
        if k not in my_micro_steps:
            continue
        x, y, m = get_batch(s, train_data, starts, device)                        # (B, T) each
        last = k == my_micro_steps[-1]
        with autocast, (train_model.no_sync() if w.size > 1 and not last else contextlib.nullcontext()):
            loss = train_model(x, y, m) / len(my_micro_steps)
            loss.backward()
        step_loss += loss.detach()
    return all_sum(step_loss).item() / w.size


def save(s, w, model, optimizer, batch_gen, done, best_val, ckpt_path):
    """Process 0 writes sft.pt: the model, the optimizer and both RNG states (--resume continues exactly)."""
    rng = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
    if w.main:
        save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                         "optimizer": optimizer.state_dict(), "step": done, "rng": rng,
                         "best_val_loss": best_val, "config": asdict(s), "kind": "sft"}, ckpt_path)


def remeasured(s, w, eval_model, val_data, device, autocast, ckpt_path):
    best_val = val_loss(s, eval_model, val_data, device, autocast, w)
    print(f"resume: the val batches changed (one of {', '.join(VAL_BATCHES)}): {ckpt_path} re-measured "
          f"on today's, val loss {best_val:.4f}; only a better one replaces it")
    return best_val


def refuse_diverged(model, vl, done, ckpt_path):
    bad = weights_problem(model)
    if bad or not math.isfinite(vl):
        why = f", the weights {bad}" if bad else ""
        raise FloatingPointError(f"val loss is {vl:.4g} at step {done}{why}: the run diverged "
                                 f"(lower --lr). {last_good(ckpt_path)}")


def check_fits(model, data):
    for split, (tokens, _) in data.items():
        if len(tokens) <= model.config.block_size + 1:
            raise ValueError(f"--block_size {model.config.block_size} is longer than the {split} text "
                             f"({len(tokens):,} tokens): a training window must fit in it")


# ---- data: token stream + reply mask, cut into random windows --------------------------------------------
def load_data(s):
    """{"train": (tokens, reply mask), "val": (...)}: uint16 / uint8 arrays of the whole split, in play order;
    with --feedback, the corrections (chat.py /fix, [流程与实践 §3.2]) appended to the training stream."""
    from data.prepare import CACHE_DIR, prepare
    prepare()  # builds data/cache/ from the vendored plays the first time (a few seconds)
    data = {split: (np.memmap(os.path.join(CACHE_DIR, f"{split}.bin"), dtype=np.uint16, mode="r"),
                    np.memmap(os.path.join(CACHE_DIR, f"{split}_mask.bin"), dtype=np.uint8, mode="r"))
            for split in ("train", "val")}
    if s.feedback:  # corrections are demonstrations too: append them to the training stream
        from data.feedback import read_feedback, sft_examples
        examples = sft_examples(read_feedback([f for f in s.feedback.split(",") if f])[0])
        turns = [encode_turn(get_tokenizer(), prompt, reply, transcript=True)   # prompt: a whole transcript
                 for prompt, reply in examples * s.feedback_copies]
        ids, mask = [t for i, _ in turns for t in i], [t for _, m in turns for t in m]
        data["train"] = tuple(np.concatenate([a, np.array(b, dtype=a.dtype)])      # uint16 tokens, uint8 mask
                              for a, b in zip(data["train"], (ids, mask)))
        print(f"added {len(examples)} corrections x {s.feedback_copies} copies ({len(ids)} tokens) from "
              f"{s.feedback}")
    return data


def draw_windows(s, split_data, gen):
    """Where batch_size random windows of block_size + 1 tokens start, (B,)."""
    return torch.randint(len(split_data[0]) - s.block_size - 1, (s.batch_size,), generator=gen)


def get_batch(s, split_data, starts, device):
    """The windows that start at `starts`: inputs x, next-token targets y, and the loss mask m (reply tokens,
    or every token with --train_on all), each (B, T)."""
    tokens, mask = split_data
    pos = (starts[:, None] + torch.arange(s.block_size)).numpy()              # (B, T) the inputs' positions
    x, y = (torch.from_numpy(tokens[p].astype(np.int64)) for p in (pos, pos + 1))         # (B, T) each
    m = torch.ones_like(y, dtype=torch.bool) if s.train_on == "all" else \
        torch.from_numpy(mask[pos + 1] > 0)                                                 # (B, T)
    return x.to(device), y.to(device), m.to(device)


@torch.no_grad()
def val_loss(s, model, val_data, device, autocast, w):
    """Mean loss over eval_iters val batches, the same windows every time, so evaluations compare; under
    torchrun each process takes its share of the batches and the sums are added up."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros((), device=device)
    for k in range(s.eval_iters):
        starts = draw_windows(s, val_data, gen)
        if k % w.size == w.rank:
            with autocast:
                total += model(*get_batch(s, val_data, starts, device)).float()
    model.train()
    return all_sum(total).item() / s.eval_iters


# ---- model and optimizer: fresh, or resumed from the checkpoint ------------------------------------------
def new_or_resumed(s, device, ckpt_path):
    """(model, AdamW, batch generator, first step, best val loss). --resume keeps the checkpoint's shape and
    takes the optimisation flags from the command line (applied, and recorded: the saved config ran)."""
    batch_gen = torch.Generator().manual_seed(s.seed)
    if not s.resume:
        model = GPT(GPTConfig(**{k: getattr(s, k) for k in SHAPE})).to(device)
        return model, make_optimizer(s, model, device), batch_gen, 0, float("inf")
    ckpt = load_checkpoint(ckpt_path, made_by="train_sft.py", kind="sft", resume=True)
    model = gpt_from_checkpoint(ckpt).to(device)
    for k in SHAPE:
        if getattr(s, k) != getattr(model.config, k):
            print(f"resume: {k} = {getattr(model.config, k)} from the checkpoint (not {getattr(s, k)}): "
                  "a resumed model keeps its shape and dropout")
            setattr(s, k, getattr(model.config, k))
    optimizer = make_optimizer(s, model, device)
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, fresh in zip(optimizer.param_groups, param_groups(model, s.weight_decay)):
        group.update(betas=(s.beta1, s.beta2), weight_decay=fresh["weight_decay"])   # today's flags
    changed = [f"{k} {v} -> {getattr(s, k)}" for k, v in ckpt["config"].items()
               if k not in SHAPE + ("resume", "preset", "overwrite") and hasattr(s, k) and getattr(s, k) != v]
    if changed:
        print("resume: changed since the checkpoint, applied: " + ", ".join(changed))
    torch.set_rng_state(ckpt["rng"]["torch"])
    batch_gen.set_state(ckpt["rng"]["batch"])
    print(f"resuming from {ckpt_path} at step {ckpt['step']} (best val loss {ckpt['best_val_loss']:.4f})")
    same_batches = all(ckpt["config"].get(k) == getattr(s, k) for k in VAL_BATCHES)
    return model, optimizer, batch_gen, ckpt["step"], ckpt["best_val_loss"] if same_batches else None


def make_optimizer(s, model, device):
    return torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2),
                             fused=torch.device(device).type == "cuda")


# ---- what a student can judge: held-out bits per character, real words, samples -------------------------
def report(s, model, device, autocast, best_val, t0, ckpt_path):
    enc = get_tokenizer()
    val_turns = load_turns("val")
    with autocast:
        bpc = bits_per_char(model, enc, val_turns, device)
        prompts = [t["prompt"] for t in val_turns[::max(1, len(val_turns) // s.n_samples)]][:s.n_samples]
        budget = min(48, model.config.block_size // 2)                      # the prompt gets the other half
        seq, _, resp_mask = generate(model, [encode_prompt(enc, p) for p in prompts], budget, temperature=1.0,
                                     generator=torch.Generator(device).manual_seed(s.seed))
    replies = decode_replies(enc, seq, resp_mask)
    rate = real_word_rate(replies)
    print(f"done in {(time.time() - t0) / 60:.1f} min: best val loss {best_val:.4f} (perplexity "
          f"{math.exp(best_val):.1f}); held-out {bpc:.3f} bits per character over {len(val_turns)} val "
          f"turns; real-word rate {rate:.3f} of {len(replies)} sampled replies (temperature 1)")
    for p, r in list(zip(prompts, replies))[:3]:
        print(f"  Human: {p}\n    Bard: {r}")
    print(f"checkpoint {ckpt_path}, plot {os.path.join(s.out_dir, 'sft_loss.png')}")
    return {"best_val_loss": best_val, "bits_per_char": bpc, "real_word_rate": rate}


@torch.no_grad()
def bits_per_char(model, enc, turns, device, batch=64):
    """Held-out loss per character: the bits of predicting each turn's reply tokens (EOT included) given its
    prompt, summed over the turns, divided by the replies' characters. Per character, not per token, so that
    models with other tokenizers compare on the same text (longer tokens: fewer, harder ones)."""
    was_training = model.training
    model.eval()
    bits, chars = 0.0, 0
    for i in range(0, len(turns), batch):
        rows = [encode_turn(enc, t["prompt"], t["reply"]) for t in turns[i:i + batch]]
        keep = model.config.block_size + 1                                    # the end of an over-long turn
        rows = [(ids[-keep:], mask[-keep:]) for ids, mask in rows]
        T = max(len(ids) for ids, _ in rows) - 1
        pad = lambda a, v: list(a) + [v] * (T - len(a))                          # noqa: E731
        x = torch.tensor([pad(ids[:-1], EOT) for ids, _ in rows])                # (B, T) right-padded inputs
        y = torch.tensor([pad(ids[1:], EOT) for ids, _ in rows])                 # (B, T) next tokens
        m = torch.tensor([pad(mask[1:], 0) for _, mask in rows], dtype=torch.bool)   # (B, T) reply targets
        loss = model(x.to(device), y.to(device), m.to(device))                    # mean nats per reply token
        bits += loss.item() * m.sum().item() / math.log(2)
        chars += sum(len(" " + t["reply"]) for t in turns[i:i + batch])
    model.train(was_training)
    return bits / chars


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else "") for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_log(path, history):
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "lr"])
    w.writeheader()
    w.writerows(history)
    write_text(path, f.getvalue())


def plot(history, path):
    plt = pyplot()
    train = [(h["step"], h["train_loss"]) for h in history if h["train_loss"] != ""]
    val = [(h["step"], h["val_loss"]) for h in history if h["val_loss"] != ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (reply tokens)")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (held-out plays)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="SFT on Shakespeare dialogue")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main)
