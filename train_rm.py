"""
Reward-model training from human feedback ([实战框架 §5.2] 奖励模型训练; losses [实战框架 §4.3.2] Bradley-Terry,
[实战框架 §4.3.1] Plackett-Luce; the kinds of feedback [流程与实践 §3.2]).

    python train_rm.py                                  # the panel labels SFT samples, then trains out/rm.pt
    python train_rm.py --data out/feedback.jsonl        # your own feedback from chat.py (or HH-RLHF JSONL)
    python train_rm.py --data a.jsonl,b.jsonl --mix_panel   # several files, mixed with the panel's labels

Steps, top to bottom (main() is one short call each):
  1. read the --data feedback files (our JSONL schema, any of the four kinds, or HH-RLHF as it is): a bad
     line stops here, before any training;
  2. load out/sft.pt (train_sft.py runs first if it is missing);
  3. the panel's labels: K SFT replies per prompt, ranked by the simulated rater panel (saved to
     out/panel_labels.jsonl); prompts from the training plays to train on, from the test plays to evaluate;
  4. the reward model: the SFT body + a scalar head, each kind of feedback through its loss (item_losses);
  5. held-out loss and accuracy against the labels and the panel's noise-free "gold" order, beside a single
     rater's and a bag-of-words model's: does the transformer beat counting words?
  6. normalise the reward to mean 0 / std 1 over SFT replies; write out/rm.pt and out/rm_curves.png.

What it simplifies: one reward model (no ensembles), one score per reply (the head's sum over the reply's
tokens, the panel's shape: kind things add up), and the panel is VADER's rules over real human word ratings
rather than people reading the text.
"""
if __name__ == "__main__":    # Ctrl-C while the imports below load (a second or two): one line, status 130
    import os
    import signal
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted (Ctrl-C) while starting\n"),
                                             os._exit(130)))
import hashlib
import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
import torch

from data.feedback import read_feedback
from data.prepare import format_prompt, get_tokenizer, load_turns, unique_prompts, words
from model import clip_and_step, lr_at, param_groups
from data.plumbing import (all_sum, barrier, end_world, flag, gather_shards, in_shares, last_good,
                           load_checkpoint, nested_settings, pyplot, run_script,
                           save_checkpoint, save_figure, start_run, weights_problem, write_text)
from data.panel import GOLD_EPS, TEMPERATURE, Panel, gold_accuracy
from reward import RewardModel, bradley_terry_loss, plackett_luce_loss, rating_loss, reply_scores
from sample import decode_replies, encode_prompt, generate, load_model


@dataclass
class Settings:
    preset: str = flag("auto", "auto | cpu | gpu", "device-sized defaults (table below); explicit flags win")
    out_dir: str = flag("out", "", "reads sft.pt, writes rm.pt, panel_labels.jsonl, rm_curves.png")
    seed: int = flag(1337, ">= 0", "seeds sampling, the panel and training")
    # feedback
    data: str = flag("", "", "comma-separated feedback JSONL files; empty = the panel labels SFT samples")
    mix_panel: bool = flag(False, "", "with --data: also add the panel's labels")
    skip_bad: bool = flag(False, "", "skip (and count) malformed lines in --data files instead of stopping")
    n_prompts: int = flag(1000, ">= 1", "training prompts (train plays) the panel labels")
    n_heldout: int = flag(200, ">= 1", "held-out prompts (test plays) for evaluation")
    k: int = flag(4, ">= 2", "replies per prompt; the panel ranks them (K=2: a comparison)")
    preference: str = flag("kind", "kind | unkind",
                           "kind: the more positive reply wins | unkind: the exercise that flips it")
    rater_temperature: float = flag(TEMPERATURE, "> 0",
                                    "a rater's choice noise: P(a > b) = sigmoid((s_a - s_b) / T)")
    max_new_tokens: int = flag(48, ">= 1", "reply length budget when sampling from the SFT model")
    temperature: float = flag(1.0, "> 0", "sampling temperature for the SFT replies")
    gen_batch: int = flag(128, ">= 1", "replies generated at once")
    # training
    epochs: int = flag(2, ">= 1", "passes over the training feedback")
    batch_size: int = flag(16, ">= 1", "feedback items (rankings / ratings) per step")
    lr: float = flag(3e-4, "> 0", "peak learning rate (linear warmup, cosine decay to min_lr)")
    min_lr: float = flag(3e-5, ">= 0", "final learning rate")
    warmup_iters: int = flag(20, ">= 0", "warmup steps")
    weight_decay: float = flag(0.0, ">= 0", "AdamW decay on weight matrices")
    readout: str = flag("sum", "sum | mean",
                        "sum | mean: the reward is the head's sum (or mean) over the reply")
    embedding_lr_mult: float = flag(10.0, "> 0",
                                    "the token embeddings learn this many times faster (each word's rating)")
    grad_clip: float = flag(1.0, ">= 0", "clip the global gradient norm (0 = off)")
    rating_weight: float = flag(1.0, ">= 0", "weight of the rating regression loss")
    eval_interval: int = flag(50, ">= 1", "held-out evaluation + checkpoint every this many steps")
    resume: bool = flag(False, "", "continue from out_dir/rm.pt (uses out_dir/panel_labels.jsonl or --data)")
    sft_args: str = flag("", "", "extra flags passed to train_sft.py when sft.pt is missing")
    device: str = flag("auto", "", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("float32", "float32 | bfloat16", "autocast dtype (fast on CUDA; slow on a CPU)")


PRESETS = {
    "cpu": dict(n_prompts=3600, n_heldout=400, max_new_tokens=40, epochs=1, lr=1e-3, min_lr=1e-4,
                eval_interval=75),
    "gpu": dict(n_prompts=12000, n_heldout=1000, gen_batch=512, epochs=1, batch_size=32, max_new_tokens=64,
                lr=1e-3, min_lr=1e-4, eval_interval=100, dtype="bfloat16"),   # lr: the sum readout's (cpu)
}


def problems(s):
    """The rules that tie settings together (each field's own range is in Settings); each names its flag."""
    out = []
    if s.min_lr > s.lr:
        out.append(f"--min_lr must be at most --lr, got {s.min_lr} > {s.lr}")
    rm_path = os.path.join(s.out_dir, "rm.pt")
    if s.resume and not os.path.exists(rm_path):
        out.append(f"--resume: {rm_path} does not exist (run without --resume to start one)")
    if not os.path.exists(os.path.join(s.out_dir, "sft.pt")):                # train_sft.py runs first
        import train_sft
        out += nested_settings("--sft_args", train_sft, s.sft_args, s.out_dir, s.preset)[1]
    written = {os.path.realpath(os.path.join(s.out_dir, f"{name}.jsonl"))      # the panel's labels go there
               for name in ("panel_labels", "panel_labels_heldout")}
    if s.mix_panel and not s.resume:
        out += [f"--data {f} is the file this run writes the panel's labels to: copy it elsewhere first"
                for f in s.data.split(",") if f and os.path.realpath(f) in written]
    if s.mix_panel and not s.data:
        out.append("--mix_panel mixes the panel's labels into --data files: give --data too")
    return out


def main(argv=None):
    s, w, device = start_run(Settings, PRESETS, argv, __doc__, problems)     # w: this process (torchrun)
    t_start = time.time()
    torch.manual_seed(s.seed)
    panel = Panel(preference=s.preference, temperature=s.rater_temperature)
    file_records = read_files(s)                                                    # 1.
    rm_path = os.path.join(s.out_dir, "rm.pt")            # --resume: a wrong rm.pt is refused before sampling
    resumed = load_checkpoint(rm_path, made_by="train_rm.py", kind="rm", resume=True) if s.resume else None
    sft_path, policy = load_sft(s, device)                                          # 2.
    rng = np.random.default_rng(s.seed + w.rank)
    panel_records = panel_labels(s, w, policy, panel, rng) if not s.data or s.mix_panel else []      # 3.
    train_items, eval_items = split(s, file_records, panel_records)
    eval_items = eval_items or panel_labels(s, w, policy, panel, rng, heldout=True)
    rm, optimizer, start_step, history = new_or_resumed(s, sft_path, device, resumed)   # 4.
    max_iters = train(s, w, rm, optimizer, train_items, eval_items, start_step, history, panel)
    ev = evaluate(s, rm, eval_items, panel)                                         # 5.
    if ev["gold_pairs"]:
        ev.update({"bow_" + k: v for k, v in bag_of_words_baseline(train_items, eval_items, panel).items()})
    normalise(s, rm, panel_records, policy)                                         # 6.
    refuse_diverged(s, rm, max_iters)
    if w.main:
        save(s, rm, optimizer, max_iters, history, sft_path, final=True)
    barrier()                                                                 # rm.pt is final on disk for all
    end_world()
    gold = (f"gold accuracy {ev['gold_acc']:.3f} vs single rater {ev['rater_ceiling']:.3f} and bag of words "
            f"{ev['bow_gold_acc']:.3f} on {ev['gold_pairs']} pairs; on the {ev['context_pairs']} context "
            f"pairs {fmt(ev['context_acc'])} vs bag of words {fmt(ev['bow_context_acc'])}"
            if ev["gold_pairs"] else
            "gold accuracy: none (the held-out labels are not the panel's: its gold order is not theirs)")
    print(f"done in {(time.time() - t_start) / 60:.1f} min: held-out label accuracy "
          f"{fmt(ev['acc'], NO_PAIRS)}, {gold} -> {rm_path}")
    return ev


# ---- 1. feedback files -------------------------------------------------------------------------------------
def read_files(s):
    files = [f for f in s.data.split(",") if f]
    if not files:
        return []
    records, n_bad = read_feedback(files, skip_bad=s.skip_bad)
    print(f"read {len(records)} feedback records from {', '.join(files)}"
          + (f" (skipped {n_bad} bad lines)" if n_bad else ""))
    return records


# ---- 2. the SFT model --------------------------------------------------------------------------------------
def load_sft(s, device):
    sft_path = os.path.join(s.out_dir, "sft.pt")
    if not os.path.exists(sft_path):
        print(f"{sft_path} is missing: running train_sft.py first (preset {s.preset}"
              + (f", flags {s.sft_args}" if s.sft_args else "") + ")")
        import train_sft
        train_sft.main(["--out_dir", s.out_dir, "--preset", s.preset] + shlex.split(s.sft_args))
    policy, _ = load_model(sft_path, device=device, kind="sft")
    if s.max_new_tokens > policy.config.block_size // 2:
        raise ValueError(f"--max_new_tokens {s.max_new_tokens} is more than half of {sft_path}'s context "
                         f"window ({policy.config.block_size} tokens)")
    return sft_path, policy


# ---- 3. the panel's labels ---------------------------------------------------------------------------------
def sample_replies(s, policy, prompts, k):
    """k replies per prompt from the SFT model, in prompt order: a list of lists of reply texts."""
    enc = get_tokenizer()
    ids = [encode_prompt(enc, p) for p in prompts for _ in range(k)]
    texts, t0 = [], time.time()
    for i in range(0, len(ids), s.gen_batch):
        seq, pad, resp_mask = generate(policy, ids[i:i + s.gen_batch], s.max_new_tokens,
                                       temperature=s.temperature)
        texts += decode_replies(enc, seq, resp_mask)
        if i == 0 or len(texts) * 10 // len(ids) > (len(texts) - s.gen_batch) * 10 // len(ids):  # ~every 10%
            print(f"  sampled {len(texts)}/{len(ids)} replies ({time.time() - t0:.0f}s)", flush=True)
    return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]


def rank_with_panel(prompts, replies, panel, rng):
    """One randomly drawn rater ranks each prompt's replies (Plackett-Luce choice noise): for each prompt a
    list of ranking records (empty when its replies are all the same: a repeated reply ranks nothing)."""
    records = []
    for p, rs in zip(prompts, replies):
        rs = list(dict.fromkeys(x.strip() for x in rs))
        if len(rs) < 2:                                                           # one reply ranks nothing
            records.append([])
            continue
        order, rater = panel.rank(rs, rng)
        records.append([{"kind": "ranking", "prompt": p, "replies": [rs[i] for i in order],
                         "rater": int(rater), "gold": [round(float(panel.gold(rs[i])), 4) for i in order],
                         "source": "panel"}])
    return records


def panel_labels(s, w, policy, panel, rng, heldout=False):
    """The panel's rankings of K SFT samples per prompt, saved as JSONL and read back: n_prompts prompts of
    the training plays, or (heldout=True) n_heldout of the test plays, which no training split contains. Under
    torchrun each process samples and ranks its share of the prompts; process 0 writes the file."""
    name, split_name, n = (("panel_labels_heldout", "test", s.n_heldout) if heldout else
                           ("panel_labels", "train", s.n_prompts))
    path = os.path.join(s.out_dir, name + ".jsonl")
    prompts = unique_prompts(load_turns(split_name), n, s.seed)
    if s.resume and os.path.exists(path):
        records, _ = read_feedback([path])
        print(f"resume: reusing {len(records)} panel labels from {path}")
        return records
    t0 = time.time()
    ranked = in_shares(lambda mine: rank_with_panel(mine, sample_replies(s, policy, mine, s.k), panel, rng),
                       prompts)                                  # torchrun: each its share; a list per prompt
    if w.main:
        write_text(path, "".join(json.dumps(r) + "\n" for per_prompt in ranked for r in per_prompt))
    barrier()                                                                 # the file is written
    records, _ = read_feedback([path])
    print(f"panel ranked {s.k} SFT replies for each of {len(prompts)} prompts in {time.time() - t0:.0f}s -> "
          f"{path}")
    return records


def split(s, file_records, panel_records):
    """Split by prompt, so no held-out prompt is trained on: --data files 90/10 by a hash of the prompt (the
    panel's held-out prompts come from other plays). Ties are kept in the files but not trained on."""
    records = file_records + panel_records
    kinds = {kind: sum(r["kind"] == kind for r in records)
             for kind in ("comparison", "ranking", "rating", "correction")}
    print("feedback kinds: " + ", ".join(f"{k}={v}" for k, v in kinds.items())
          + f"; ties (kept, not trained on): {sum(r['tie'] for r in records)}")
    held = {r["prompt"] for r in file_records if hash_unit(r["prompt"], s.seed) < 0.1}
    trainable = panel_records + [r for r in file_records if r["prompt"] not in held]
    train_items = [r for r in trainable if not r["tie"]]
    eval_items = [r for r in file_records if r["prompt"] in held and not r["tie"]]
    if not train_items:
        raise ValueError(f"no usable feedback to train on ({len(records)} records; ties are not trained on)")
    print(f"train items: {len(train_items)}, held-out items: "
          + (f"{len(eval_items)} (from the --data files)" if eval_items else "the panel's (test plays)"))
    return train_items, eval_items


def hash_unit(text, seed):
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 16 ** 8


# ---- 4. the reward model and its training loop -------------------------------------------------------------
def new_or_resumed(s, sft_path, device, ckpt):
    """(reward model, AdamW, first step, history): from the SFT checkpoint, or from rm.pt's dict `ckpt`."""
    if ckpt is not None:
        rm = RewardModel.from_checkpoint(ckpt).to(device)
        print(f"resuming from {os.path.join(s.out_dir, 'rm.pt')} at step {ckpt['step']}")
    else:
        sft = load_checkpoint(sft_path, made_by="train_sft.py", kind="sft")
        torch.manual_seed(s.seed)                      # the same fresh head, whatever sampling came before
        rm = RewardModel.from_sft(sft, s.readout).to(device)
    optimizer = torch.optim.AdamW(rm_param_groups(s, rm), lr=s.lr, fused=torch.device(device).type == "cuda")
    if ckpt is None:
        return rm, optimizer, 0, []
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, fresh in zip(optimizer.param_groups, rm_param_groups(s, rm)):
        group.update(weight_decay=fresh["weight_decay"], lr_mult=fresh["lr_mult"])   # today's flags
    optimisation = ("lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "rating_weight",
                    "embedding_lr_mult")
    changed = [f"{k} {ckpt['config'][k]} -> {getattr(s, k)}" for k in optimisation
               if k in ckpt["config"] and ckpt["config"][k] != getattr(s, k)]
    if changed:
        print("resume: changed since the checkpoint, applied: " + ", ".join(changed))
    return rm, optimizer, ckpt["step"], ckpt.get("history", [])


def rm_param_groups(s, rm):
    """AdamW groups: the token embeddings learn embedding_lr_mult times faster: the panel judges words, and
    a word's row only learns when it occurs (gold accuracy 0.786 with x10 against 0.737, README)."""
    emb = rm.body.wte.weight
    groups = param_groups(rm, s.weight_decay)
    for g in groups:
        g["params"] = [p for p in g["params"] if p is not emb]
        g["lr_mult"] = 1.0
    return groups + [{"params": [emb], "weight_decay": 0.0, "lr_mult": s.embedding_lr_mult}]


def item_losses(s, rm, batch, counts=None):
    """The loss of a batch of feedback items, and each item's reply scores (all scored in one forward pass):
      comparisons (two replies: comparison, correction, a ranking of two)   bradley_terry_loss
      rankings of three or more replies                                       plackett_luce_loss
      ratings (added times rating_weight)                                     rating_loss
    The ranked items' loss is their mean (Plackett-Luce of two IS Bradley-Terry). counts = (ranked, rated,
    processes) of the whole batch when `batch` is one process's share (torchrun): the means are over the
    whole batch, times the processes, which DDP's gradient average divides back out. rm may be in DDP."""
    device = next(rm.parameters()).device
    prompts = [p for r in batch for p in r["prompts"]]
    replies = [x for r in batch for x in r["replies"]]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16"):
        flat = reply_scores(rm, get_tokenizer(), prompts, replies)               # (N,) one score per reply
    scores = flat.split([len(r["replies"]) for r in batch])                 # each item's replies, best first
    pairs = [sc for r, sc in zip(batch, scores) if r["kind"] != "rating" and len(sc) == 2]
    lists = [sc for r, sc in zip(batch, scores) if r["kind"] != "rating" and len(sc) > 2]
    rated = [(r, sc) for r, sc in zip(batch, scores) if r["kind"] == "rating"]
    n_ranked, n_rated, scale = counts if counts else (len(pairs) + len(lists), len(rated), 1)
    loss = torch.zeros((), device=device)
    if pairs:
        chosen, rejected = torch.stack(pairs).unbind(1)                          # (n2,) each
        loss = loss + bradley_terry_loss(chosen, rejected) * len(pairs) / n_ranked
    if lists:
        table = torch.nn.utils.rnn.pad_sequence(lists, batch_first=True)         # (nK, K) scores best first
        lengths = torch.tensor([len(sc) for sc in lists], device=device)          # (nK,)
        mask = torch.arange(table.shape[1], device=device) < lengths[:, None]     # (nK, K) present replies
        loss = loss + plackett_luce_loss(table, mask) * len(lists) / n_ranked
    if rated:
        r_scores = torch.cat([sc for _, sc in rated])                            # (nR,)
        ratings, lo, hi = torch.tensor([[r["rating"], *r["scale"]] for r, _ in rated], dtype=torch.float32,
                                       device=device).T                           # (nR,) each
        loss = loss + s.rating_weight * rating_loss(r_scores, ratings, lo, hi) * len(rated) / n_rated
    return loss * scale, [sc.detach().tolist() for sc in scores]


def batches_of(s, train_items, world=1):
    """Every step's item indices: each epoch a fresh permutation (its own generator: a resumed run gets the
    same batches) in batch_size pieces; under torchrun a last piece under world items joins the one before."""
    gen, batches = torch.Generator().manual_seed(s.seed), []
    for _ in range(s.epochs):
        perm = torch.randperm(len(train_items), generator=gen).tolist()
        epoch = [perm[i:i + s.batch_size] for i in range(0, len(perm), s.batch_size)]
        if world > 1 and len(epoch) > 1 and len(epoch[-1]) < world:
            epoch[-2:] = [epoch[-2] + epoch[-1]]
        batches += epoch
    return batches


def train(s, w, rm, optimizer, train_items, eval_items, start_step, history, panel):
    """The loop: AdamW with warmup + cosine decay, gradient clipping; a held-out evaluation and a
    checkpoint every eval_interval steps. Under torchrun each process scores its share of every batch."""
    ddp_rm = w.wrap(rm)                                               # torchrun: DDP averages the gradients
    rm.train()
    batches = batches_of(s, train_items, w.size)
    max_iters, t0 = len(batches), time.time()
    for step in range(start_step, max_iters):
        lr = lr_at(step, s.lr, s.min_lr, s.warmup_iters, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batch = [train_items[i] for i in batches[step]]
        n_rated = sum(r["kind"] == "rating" for r in batch)
        counts = (len(batch) - n_rated, n_rated, w.size)
        loss, scores = item_losses(s, ddp_rm, w.shard(batch), counts)            # this process's share
        loss.backward()
        loss = all_sum(loss.detach()) / w.size                                   # the whole batch's loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reward-model loss is {loss.item()} at step {step + 1}; lower --lr or "
                                     f"check the data. {last_good(os.path.join(s.out_dir, 'rm.pt'))}")
        clip_and_step(optimizer, rm.parameters(), s.grad_clip)
        done = step + 1
        right = [a > b for sc in gather_shards(scores) for a, b in combinations(sc, 2)]
        train_acc = float(np.mean(right)) if right else math.nan            # pairs ordered like the labels
        history.append({"step": done, "train_loss": loss.item(), "train_acc": train_acc})
        if done % 10 == 0:
            eta = (time.time() - t0) / (done - start_step) * (max_iters - done)
            pair_acc = f"{train_acc:.2f}" if math.isfinite(train_acc) else "n/a"   # ratings have no pairs
            print(f"step {done:4d}/{max_iters} | loss {loss.item():.4f} | pair acc {pair_acc} | "
                  f"lr {lr:.1e} | ETA {eta / 60:.1f} min", flush=True)
        if done % s.eval_interval == 0 or done == max_iters:
            ev = evaluate(s, rm, eval_items, panel)
            history.append({"step": done, **{"eval_" + k: v for k, v in ev.items()}})
            gold = (f" | gold acc {ev['gold_acc']:.3f} (single rater {ev['rater_ceiling']:.3f}, "
                    f"{ev['gold_pairs']} pairs; context pairs {fmt(ev['context_acc'])})"
                    if ev["gold_pairs"] else "")
            print(f"step {done:4d} | held-out loss {ev['loss']:.4f} | label acc "
                  f"{fmt(ev['acc'], NO_PAIRS)}{gold}", flush=True)
            refuse_diverged(s, rm, done)                                      # every process: all stop
            if w.main:
                save(s, rm, optimizer, done, history, os.path.join(s.out_dir, "sft.pt"))
    return max_iters


def refuse_diverged(s, rm, step):
    bad = weights_problem(rm)
    if bad:
        raise FloatingPointError(f"the reward model's weights are {bad} at step {step}: the run diverged "
                                 f"(lower --lr). {last_good(os.path.join(s.out_dir, 'rm.pt'))}")


def save(s, rm, optimizer, step, history, sft_path, final=False):
    ckpt = {**rm.checkpoint_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(s),
            "kind": "rm", "final": final, "sft_ckpt": sft_path, "history": history}
    save_checkpoint(ckpt, os.path.join(s.out_dir, "rm.pt"))
    plot(history, os.path.join(s.out_dir, "rm_curves.png"))


# ---- 5. held-out evaluation --------------------------------------------------------------------------------
NO_PAIRS = "n/a (the held-out items are ratings: no pairs)"


def fmt(acc, nothing="n/a"):
    return nothing if acc is None or math.isnan(acc) else f"{acc:.3f}"      # None or nan: nothing to count


@torch.no_grad()
def evaluate(s, rm, items, panel):
    """Held-out loss and accuracy against the labels (every ordered pair of every ranked item); for the
    panel's labels also against its gold order (gold_verdict; ties count as wrong) and a single rater's.
    Under torchrun each process scores its share of the batches; every process gets all the scores."""
    was_training = rm.training
    rm.eval()
    batches = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]

    def score_batch(batch):
        loss, scores = item_losses(s, rm, batch)
        return batch, loss.item(), scores
    scored = in_shares(lambda mine: [score_batch(b) for b in mine], batches)   # torchrun: each its share
    rm.train(was_training)
    pairs = [(r["replies"][a], r["replies"][b], sc[a], sc[b])   # (better, worse, their scores)
             for batch, _, scores in scored for r, sc in zip(batch, scores) if r["kind"] != "rating"
             for a, b in combinations(range(len(sc)), 2)]
    better, worse, s_better, s_worse = map(list, zip(*pairs)) if pairs else ([], [], [], [])
    ev = {"loss": sum(loss for _, loss, _ in scored) / len(batches),
          "acc": float(np.mean(np.greater(s_better, s_worse))) if pairs else math.nan, "gold_acc": math.nan,
          "rater_ceiling": math.nan, "gold_pairs": 0, "context_acc": None, "context_pairs": 0}
    if (pairs and all(r["meta"].get("source") == "panel" for r in items)
            and (np.abs(panel.golds(better) - panel.golds(worse)) > 0).any()):         # gold means something
        ev.update(gold_verdict(panel, better, worse, s_better, s_worse))
        ev["rater_ceiling"], _ = panel.single_rater_ceiling(list(zip(better, worse)))
    return ev


def gold_verdict(panel, better, worse, score_better, score_worse):
    """How often scores order pairs like the panel's gold (data.panel.gold_accuracy), on all pairs and on the
    "context pairs" gold orders unlike Panel.bag_of_words_gold: only reading "not", "but", "!" gets them."""
    g_better, g_worse = panel.golds(better), panel.golds(worse)
    bow = [np.array([panel.bag_of_words_gold(x) for x in xs]) for xs in (better, worse)]
    context = np.sign(g_better - g_worse) != np.sign(bow[0] - bow[1])                    # (P,)
    out = dict(zip(("gold_acc", "gold_pairs"), gold_accuracy(score_better, score_worse, g_better, g_worse)))
    out["context_acc"], out["context_pairs"] = None, 0                        # None, not nan: nan != nan
    if (context & (np.abs(g_better - g_worse) >= GOLD_EPS)).any():
        pick = lambda x: np.asarray(x, dtype=np.float64)[context]             # noqa: E731
        out["context_acc"], out["context_pairs"] = gold_accuracy(pick(score_better), pick(score_worse),
                                                                 g_better[context], g_worse[context])
    return out


def bag_of_words_baseline(train_items, eval_items, panel, l2s=(1e-5, 1e-4, 1e-3, 1e-2), steps=300, lr=0.3):
    """Does the transformer beat counting words? score = theta . f, f 1 for each distinct training word a
    reply uses (the panel without its context rules), fitted by full-batch Adam with the same Bradley-Terry
    loss on every pair of every ranking plus l2 * |theta|^2; l2 chosen on a tenth of the training prompts
    held back (their labels, never gold), then refitted on all. Returns gold_verdict on the held-out pairs."""
    ranked = [r for r in train_items if r["kind"] != "rating"]
    vocab = {v: i for i, v in enumerate(sorted({v for r in ranked for x in r["replies"] for v in words(x)}))}

    def pair_scores(items):   # theta -> (better, worse) scores theta . f, (P,) each; and the pairs' texts
        # (f: 1 per word a reply uses). index_select, not theta[word]: its backward is an index_add, twice as
        # fast as indexing's on a CPU
        texts = [x for r in items for x in r["replies"]]
        firsts = np.cumsum([0] + [len(r["replies"]) for r in items])       # where each item's replies start
        pairs = [p for r, n in zip(items, firsts) for p in combinations(range(n, n + len(r["replies"])), 2)]
        a, b = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T                  # (P,) better, worse
        cells = [(n, vocab[v]) for n, x in enumerate(texts) for v in sorted(set(words(x))) if v in vocab]
        reply, word = torch.tensor(cells, dtype=torch.long).reshape(-1, 2).T           # (C,) each: a cell

        def score(theta):
            sc = torch.zeros(len(texts)).index_add(0, reply, theta.index_select(0, word))   # (n_replies,)
            return sc.index_select(0, a), sc.index_select(0, b)
        return score, [texts[i] for i in a], [texts[i] for i in b]

    def fit(items, l2):
        score, theta = pair_scores(items)[0], torch.zeros(len(vocab), requires_grad=True)   # (V,)
        opt = torch.optim.Adam([theta], lr=lr)
        for _ in range(steps):
            loss = bradley_terry_loss(*score(theta)) + l2 * (theta ** 2).sum()
            opt.zero_grad(), loss.backward(), opt.step()
        return theta.detach()

    held = [r for r in ranked if hash_unit(r["prompt"], 0) < 0.1]
    kept = [r for r in ranked if hash_unit(r["prompt"], 0) >= 0.1]
    label_acc = {l2s[len(l2s) // 2]: 1.0}                               # too few labels to choose: the middle
    if held and kept:
        score = pair_scores(held)[0]
        for l2 in l2s:
            better, worse = score(fit(kept, l2))
            label_acc[l2] = float((better > worse).float().mean())
    score, better, worse = pair_scores([r for r in eval_items if r["kind"] != "rating"])
    sc_better, sc_worse = score(fit(ranked, max(label_acc, key=label_acc.get)))
    return gold_verdict(panel, better, worse, sc_better.numpy(), sc_worse.numpy())


# ---- 6. normalisation --------------------------------------------------------------------------------------
@torch.no_grad()
def normalise(s, rm, panel_records, policy):
    """Set reward_mean / reward_std to the mean and std of the raw scores of SFT replies, so PPO sees
    rewards of unit scale: the panel's training replies (SFT samples already), or 256 fresh samples."""
    if panel_records:
        pairs = [(r["prompt"], x) for r in panel_records[:512] for x in r["replies"]]
    else:
        prompts = unique_prompts(load_turns("train"), 256, s.seed + 1)
        pairs = [(format_prompt(p), x[0]) for p, x in zip(prompts, sample_replies(s, policy, prompts, 1))]
    rm.eval()
    chunks = [pairs[i:i + 64] for i in range(0, len(pairs), 64)]
    enc = get_tokenizer()
    raw = in_shares(lambda mine: [reply_scores(rm, enc, [p for p, _ in c], [x for _, x in c]).tolist()
                                  for c in mine], chunks)                        # torchrun: each its share
    raw = torch.tensor([x for chunk in raw for x in chunk], dtype=torch.float64)
    rm.reward_mean, rm.reward_std = raw.mean().item(), raw.std(unbiased=False).item() + 1e-6
    print(f"reward normalised over {len(raw)} SFT replies: mean {rm.reward_mean:.4f}, "
          f"std {rm.reward_std:.4f}")


def plot(history, path):
    plt = pyplot()
    tr = [h for h in history if "train_loss" in h]
    ev = [h for h in history if "eval_loss" in h]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        a1.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], alpha=0.5, label="train loss")
    if ev:
        a1.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="held-out loss")
        a2.plot([h["step"] for h in ev], [h["eval_acc"] for h in ev], "o-", label="accuracy vs labels")
        if ev[-1]["eval_gold_pairs"]:
            a2.plot([h["step"] for h in ev], [h["eval_gold_acc"] for h in ev], "o-", label="accuracy vs gold")
            a2.axhline(ev[-1]["eval_rater_ceiling"], ls="--", c="gray", label="single rater vs gold")
    a1.set_xlabel("step"); a1.set_ylabel("loss"); a1.legend(); a1.grid(alpha=0.3)
    a2.set_xlabel("step"); a2.set_ylabel("held-out pairwise accuracy"); a2.legend(); a2.grid(alpha=0.3)
    fig.suptitle("Reward model")
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main)
