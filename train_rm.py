"""
Reward-model training from human feedback (book §5.2; losses §4.3.1 Plackett–Luce, §4.3.2 Bradley–Terry).

    python train_rm.py                                  # panel labels SFT samples, then trains out/rm.pt
    python train_rm.py --data out/feedback.jsonl        # your own feedback from chat.py (or HH-RLHF JSONL)
    python train_rm.py --data a.jsonl,b.jsonl --mix_panel   # several files, mixed with the panel's labels
    python train_rm.py --help

Steps, top to bottom:
  1. load out/sft.pt (train_sft.py runs first if it is missing);
  2. feedback: by default sample K replies per training prompt from the SFT model and let the simulated
     rater panel rank them (saved to out/panel_labels.jsonl to inspect or reuse with --data); or read
     --data files (our JSONL schema, any of the four kinds, or Anthropic HH-RLHF as-is);
  3. train the reward model: SFT body + scalar head, Plackett–Luce loss on rankings (K=2 is
     Bradley–Terry), regression on ratings;
  4. held-out evaluation on prompts from plays the model never saw: loss, accuracy against the labels,
     accuracy against the panel's noise-free "gold" order, beside a single rater's agreement with gold;
  5. normalise the reward to mean 0 / std 1 over SFT replies and write out/rm.pt and out/rm_curves.png.

What it simplifies: one reward model (no ensembles), the score is read at the final <|endoftext|>
token only, and the panel is a lexicon of real human word ratings rather than people reading the text.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model import format_prompt, get_tokenizer, load_checkpoint, param_groups, parse_settings, save_checkpoint
from reward import GOLD_EPS, Panel, RewardModel, batch_replies, plackett_luce_loss, rating_loss, read_feedback
from sample import decode_replies, encode_prompt, generate, load_model


@dataclass
class Settings:
    preset: str = "auto"             # auto | cpu | gpu: device-sized defaults (table below); explicit flags win
    out_dir: str = "out"             # reads sft.pt, writes rm.pt, panel_labels.jsonl, rm_log.csv, rm_curves.png
    seed: int = 1337                 # seeds sampling, the panel and training
    # feedback
    data: str = ""                   # comma-separated feedback JSONL files; empty = the simulated panel labels SFT samples
    mix_panel: bool = False          # with --data: also add the panel's labels
    skip_bad: bool = False           # skip (and count) malformed lines in --data files instead of stopping
    n_prompts: int = 1000            # training prompts (train plays) the panel labels
    n_heldout: int = 200             # held-out prompts (test plays) for evaluation
    k: int = 4                       # replies per prompt; the panel ranks them (K=2: a comparison)
    preference: str = "kind"         # kind: the more positive reply wins | unkind: the exercise that flips it
    rater_temperature: float = 0.1   # a rater's decision noise: P(a > b) = sigmoid((s_a - s_b) / T)
    max_new_tokens: int = 48         # reply length budget when sampling from the SFT model
    temperature: float = 1.0         # sampling temperature for the SFT replies
    gen_batch: int = 128             # replies generated at once
    # training
    epochs: int = 2                  # passes over the training feedback
    batch_size: int = 16             # feedback items (rankings / ratings) per step
    lr: float = 3e-4                 # peak learning rate (linear warmup, cosine decay)
    warmup_iters: int = 20           # warmup steps
    weight_decay: float = 0.0        # AdamW decay on weight matrices
    grad_clip: float = 1.0           # clip the global gradient norm (0 = off)
    rating_weight: float = 1.0       # weight of the rating regression loss
    eval_interval: int = 50          # held-out evaluation + checkpoint every this many steps
    resume: bool = False             # continue from out_dir/rm.pt (uses out_dir/panel_labels.jsonl or --data)
    sft_args: str = ""               # extra flags passed to train_sft.py when sft.pt is missing
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "float32"           # float32 | bfloat16 autocast (fast on CUDA; works on a CPU, slowly)


PRESETS = {
    "cpu": dict(n_prompts=1200, n_heldout=150, max_new_tokens=40, epochs=3, lr=1e-3, eval_interval=75),
    "gpu": dict(n_prompts=8000, n_heldout=500, gen_batch=512, epochs=2, batch_size=32, max_new_tokens=64,
                eval_interval=100, dtype="bfloat16"),
}


def main(argv=None):
    s = parse_settings(Settings, PRESETS, argv, doc=__doc__)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    print(f"preset: {s.preset} on {device}  (override any setting with --name value; --help lists them)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()))
    t_start = time.time()
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    enc = get_tokenizer()
    rng = np.random.default_rng(s.seed)
    panel = Panel(preference=s.preference, temperature=s.rater_temperature)
    sft_path, rm_path = os.path.join(s.out_dir, "sft.pt"), os.path.join(s.out_dir, "rm.pt")

    # ---- 1. the SFT model (trained first if missing) ------------------------------------------------------
    if not os.path.exists(sft_path):
        print(f"{sft_path} is missing: running train_sft.py first (preset {s.preset}"
              + (f", flags {s.sft_args}" if s.sft_args else "") + ")")
        import train_sft
        train_sft.main(["--out_dir", s.out_dir, "--preset", s.preset] + s.sft_args.split())
    sft_ckpt = load_checkpoint(sft_path, made_by="train_sft.py")
    policy, _ = load_model(sft_path, device=device)
    block_size = policy.config.block_size

    def sample_replies(prompts, k):
        """k replies per prompt from the SFT model, in prompt order: list of lists of reply texts."""
        ids = [encode_prompt(enc, p) for p in prompts for _ in range(k)]
        texts, t0 = [], time.time()
        for i in range(0, len(ids), s.gen_batch):
            seq, pad, resp_mask = generate(policy, ids[i:i + s.gen_batch], s.max_new_tokens, temperature=s.temperature)
            texts += decode_replies(enc, seq, resp_mask)
            print(f"  sampled {len(texts)}/{len(ids)} replies ({time.time() - t0:.0f}s)", flush=True)
        return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]

    def panel_rankings(prompts, replies):
        """The panel ranks each prompt's replies: one randomly drawn rater, Plackett–Luce choice noise."""
        records = []
        for p, rs in zip(prompts, replies):
            rs = list(dict.fromkeys(x.strip() for x in rs if x.strip()))  # empty or repeated replies rank nothing
            if len(rs) < 2:
                continue
            order, rater = panel.rank(rs, rng)
            records.append({"kind": "ranking", "prompt": p, "replies": [rs[i] for i in order], "rater": int(rater),
                            "gold": [round(float(panel.gold(rs[i])), 4) for i in order], "source": "panel"})
        return records

    def labelled(prompts, path):
        """Sample K SFT replies per prompt, let the panel rank them, save as JSONL and read it back."""
        t0 = time.time()
        write_jsonl(path, panel_rankings(prompts, sample_replies(prompts, s.k)))
        records, _ = read_feedback([path])
        print(f"panel ranked {s.k} SFT replies for each of {len(prompts)} prompts in {time.time() - t0:.0f}s -> {path}")
        return records

    # ---- 2. feedback: files given with --data, and/or the panel's rankings of SFT samples -----------------
    from data.prepare import load_turns
    files = [f for f in s.data.split(",") if f]
    file_records, panel_records = [], []
    if files:
        file_records, n_bad = read_feedback(files, skip_bad=s.skip_bad)
        print(f"read {len(file_records)} feedback records from {', '.join(files)}" + (f" (skipped {n_bad} bad lines)" if n_bad else ""))
    labels_path = os.path.join(s.out_dir, "panel_labels.jsonl")
    if not files or s.mix_panel:
        if s.resume and os.path.exists(labels_path):
            panel_records, _ = read_feedback([labels_path])
            print(f"resume: reusing {len(panel_records)} panel labels from {labels_path}")
        else:
            panel_records = labelled(unique_prompts(load_turns("train"), s.n_prompts, s.seed), labels_path)
    records = file_records + panel_records
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in ("comparison", "ranking", "rating", "correction")}
    print("feedback kinds: " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f"; ties (kept, not trained on): {sum(r['tie'] for r in records)}")
    # Split by prompt, so no held-out prompt is ever trained on: --data files 90/10 by a hash of the prompt;
    # the panel's held-out set is prompts from plays that are not in the training split at all.
    held = {r["prompt"] for r in file_records if hash_unit(r["prompt"], s.seed) < 0.1}
    train_items = [r for r in panel_records + [r for r in file_records if r["prompt"] not in held] if not r["tie"]]
    eval_items = [r for r in file_records if r["prompt"] in held and not r["tie"]]
    if not train_items:
        sys.exit(f"error: no usable feedback to train on ({len(records)} records, ties are not trained on)")
    if not eval_items:
        heldout_path = os.path.join(s.out_dir, "panel_labels_heldout.jsonl")
        if s.resume and os.path.exists(heldout_path):
            eval_items, _ = read_feedback([heldout_path])
            print(f"resume: reusing {len(eval_items)} held-out panel labels from {heldout_path}")
        else:
            eval_items = labelled(unique_prompts(load_turns("test"), s.n_heldout, s.seed), heldout_path)
    print(f"train items: {len(train_items)}, held-out items: {len(eval_items)}")

    # ---- 3. the reward model --------------------------------------------------------------------------------
    if s.resume:
        rm_ckpt = load_checkpoint(rm_path, made_by="train_rm.py")
        rm = RewardModel.from_checkpoint(rm_ckpt).to(device)
        start_step = rm_ckpt["step"]
        print(f"resuming from {rm_path} at step {start_step}")
    else:
        rm, start_step = RewardModel.from_sft(sft_ckpt).to(device), 0
    optimizer = torch.optim.AdamW(param_groups(rm, s.weight_decay), lr=s.lr, fused=torch.device(device).type == "cuda")
    if s.resume:
        optimizer.load_state_dict(rm_ckpt["optimizer"])
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")
    steps_per_epoch = math.ceil(len(train_items) / s.batch_size)
    max_iters = s.epochs * steps_per_epoch

    def item_losses(batch):
        """Loss, (chosen, rejected) score pairs, and each item's reply scores, for a batch of feedback items."""
        prompts, replies, owner = [], [], []
        for j, r in enumerate(batch):
            for reply in r["replies"]:
                prompts.append(enc.encode_ordinary(r["prompt"]))
                replies.append(enc.encode_ordinary(" " + reply.strip()) + [enc.eot_token])
                owner.append(j)
        idx, pad, last = batch_replies(enc, prompts, replies, block_size)
        with autocast:
            scores = rm(idx.to(device), last.to(device), pad.to(device)).float()   # (N,) one per reply
        loss, pairs = torch.zeros((), device=device), []
        ranked = [j for j, r in enumerate(batch) if r["kind"] != "rating"]
        if ranked:  # comparisons, rankings, corrections: Plackett–Luce over each list (K=2: Bradley–Terry)
            K = max(len(batch[j]["replies"]) for j in ranked)
            table = torch.zeros(len(ranked), K, device=device)                    # (n, K) scores best-first
            mask = torch.zeros(len(ranked), K, dtype=torch.bool, device=device)   # (n, K) present replies
            for row, j in enumerate(ranked):
                pos = [i for i, o in enumerate(owner) if o == j]
                table[row, :len(pos)] = scores[pos]
                mask[row, :len(pos)] = True
                pairs += [(scores[pos[a]], scores[pos[b]]) for a in range(len(pos)) for b in range(a + 1, len(pos))]
            loss = loss + plackett_luce_loss(table, mask)
        rated = [i for i, o in enumerate(owner) if batch[o]["kind"] == "rating"]
        if rated:
            rated_records = [batch[owner[i]] for i in rated]
            ratings = torch.tensor([float(r["rating"]) for r in rated_records], device=device)    # (n,)
            lo = torch.tensor([float(r["scale"][0]) for r in rated_records], device=device)       # (n,) scale bottom
            hi = torch.tensor([float(r["scale"][1]) for r in rated_records], device=device)       # (n,) scale top
            loss = loss + s.rating_weight * rating_loss(scores[rated], ratings, lo, hi)
        values = scores.detach().tolist()                                          # one device sync per batch
        item_scores = [[values[i] for i, o in enumerate(owner) if o == j] for j in range(len(batch))]
        return loss, pairs, item_scores

    @torch.no_grad()
    def evaluate():
        rm.eval()
        losses, agree, gold_agree, ceiling = [], [], [], []
        for i in range(0, len(eval_items), s.batch_size):
            batch = eval_items[i:i + s.batch_size]
            loss, pairs, item_scores = item_losses(batch)
            losses.append(loss.item())
            agree += [float(c > r) for c, r in pairs]
            for r, sc in zip(batch, item_scores):  # the panel's gold order on every pair with different gold
                if r["kind"] == "rating":
                    continue
                rs = r["replies"]
                for a in range(len(rs)):
                    for b in range(a + 1, len(rs)):
                        ga, gb = panel.gold(rs[a]), panel.gold(rs[b])
                        if abs(ga - gb) < GOLD_EPS:  # equal gold: no order to agree with
                            continue
                        gold_agree.append(float((sc[a] > sc[b]) == (ga > gb)))
                        ceiling.append(panel.agree_prob(rs[a], rs[b]))
        rm.train()
        return dict(loss=float(np.mean(losses)), acc=float(np.mean(agree)) if agree else float("nan"),
                    gold_acc=float(np.mean(gold_agree)) if gold_agree else float("nan"),
                    rater_ceiling=float(np.mean(ceiling)) if ceiling else float("nan"), gold_pairs=len(gold_agree))

    history = rm_ckpt.get("history", []) if s.resume else []

    def save(step, final=False):
        ckpt = {**rm.checkpoint_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(s),
                "kind": "rm", "final": final, "sft_ckpt": sft_path, "history": history}
        save_checkpoint(ckpt, rm_path)
        plot(history, os.path.join(s.out_dir, "rm_curves.png"))

    # ---- the loop -------------------------------------------------------------------------------------------
    rm.train()
    order_gen = torch.Generator().manual_seed(s.seed)  # its own generator: a resumed run gets the same batches
    batches = []  # max_iters lists of item indices: each epoch a fresh permutation, cut into batches
    for _ in range(s.epochs):
        perm = torch.randperm(len(train_items), generator=order_gen).tolist()
        batches += [perm[i:i + s.batch_size] for i in range(0, len(perm), s.batch_size)]
    t0 = time.time()
    for step in range(start_step, max_iters):
        lr = s.lr * min(1.0, (step + 1) / max(1, s.warmup_iters)) * 0.5 * (1 + math.cos(math.pi * step / max_iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train_items[i] for i in batches[step]]
        loss, pairs, _ = item_losses(batch)
        if not torch.isfinite(loss):
            sys.exit(f"error: reward-model loss is {loss.item()} at step {step}; lower --lr or check the feedback data")
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(rm.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        train_acc = float(np.mean([c.item() > r.item() for c, r in pairs])) if pairs else float("nan")
        history.append({"step": done, "train_loss": loss.item(), "train_acc": train_acc})
        if done % 10 == 0:
            eta = (time.time() - t0) / (done - start_step) * (max_iters - done)
            print(f"step {done:4d}/{max_iters} | loss {loss.item():.4f} | pair acc {train_acc:.2f} | lr {lr:.1e} | ETA {eta / 60:.1f} min", flush=True)
        if done % s.eval_interval == 0 or done == max_iters:
            ev = evaluate()
            history.append({"step": done, **{"eval_" + k: v for k, v in ev.items()}})
            print(f"step {done:4d} | held-out loss {ev['loss']:.4f} | label acc {ev['acc']:.3f} | "
                  f"gold acc {ev['gold_acc']:.3f} (single rater {ev['rater_ceiling']:.3f}, {ev['gold_pairs']} pairs)", flush=True)
            save(done)

    # ---- 5. normalise over SFT replies so PPO sees unit-scale rewards ------------------------------------------
    if panel_records:  # the panel's training replies are SFT samples already
        norm_pairs = [(r["prompt"], x) for r in panel_records[:512] for x in r["replies"]]
    else:
        prompts = unique_prompts(load_turns("train"), 256, s.seed + 1)
        norm_pairs = [(format_prompt(p), x[0]) for p, x in zip(prompts, sample_replies(prompts, 1))]
    rm.eval()
    raw = []
    with torch.no_grad():
        for i in range(0, len(norm_pairs), 64):
            chunk = norm_pairs[i:i + 64]
            idx, pad, last = batch_replies(enc, [enc.encode_ordinary(p) for p, _ in chunk],
                                           [enc.encode_ordinary(" " + x.strip()) + [enc.eot_token] for _, x in chunk], block_size)
            raw += rm(idx.to(device), last.to(device), pad.to(device)).float().tolist()
    rm.reward_mean, rm.reward_std = float(np.mean(raw)), float(np.std(raw)) + 1e-6
    ev = evaluate()
    save(max_iters, final=True)
    print(f"reward normalised over {len(raw)} SFT replies: mean {np.mean(raw):.4f}, std {np.std(raw):.4f}")
    print(f"done in {(time.time() - t_start) / 60:.1f} min: held-out label accuracy {ev['acc']:.3f}, "
          f"gold accuracy {ev['gold_acc']:.3f} vs single-rater ceiling {ev['rater_ceiling']:.3f} "
          f"on {ev['gold_pairs']} pairs -> {rm_path}")
    return ev


def unique_prompts(turns, n, seed):
    """Up to n distinct prompts (human turns) from a split, in a seeded random order."""
    prompts = sorted({t["prompt"] for t in turns})
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def hash_unit(text, seed):
    import hashlib
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 16 ** 8


def write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [h for h in history if "train_loss" in h]
    ev = [h for h in history if "eval_loss" in h]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        a1.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], alpha=0.5, label="train loss")
    if ev:
        a1.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="held-out loss")
        a2.plot([h["step"] for h in ev], [h["eval_acc"] for h in ev], "o-", label="accuracy vs labels")
        a2.plot([h["step"] for h in ev], [h["eval_gold_acc"] for h in ev], "o-", label="accuracy vs gold")
        a2.axhline(ev[-1]["eval_rater_ceiling"], ls="--", c="gray", label="single rater vs gold")
    a1.set_xlabel("step"); a1.set_ylabel("loss"); a1.legend(); a1.grid(alpha=0.3)
    a2.set_xlabel("step"); a2.set_ylabel("held-out pairwise accuracy"); a2.legend(); a2.grid(alpha=0.3)
    fig.suptitle("Reward model")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # expected errors (missing file, bad feedback data): no traceback
        sys.exit(f"error: {e}")
