"""
RLHF with PPO (book §3.1 PPO, §3.3 policy optimisation, §4.2.1-4.2.3): teach the Bard kindness.

    python train_ppo.py                  # the whole pipeline: sft -> rm -> ppo, each trained if missing
    python train_ppo.py --init_kl_coef 0 --adaptive_kl false --out_dir out/beta0   # the reward-hacking exercise
    python train_ppo.py --resume         # continue out/ppo.pt
    python train_ppo.py --help

Each iteration, top to bottom (the functions below main() hold each step):
  1. rollout   sample a batch of training prompts; the policy replies with pure sampling (temperature 1,
               no top-k/top-p, so log-probs are those of the distribution sampled from and KL is unbiased)
  2. score     reward model score of each reply (normalised; a penalty if it never ended), log-probs under
               the policy and the frozen SFT reference, critic values; per-token rewards -beta*KL plus the
               score at the last token; GAE advantages and returns; advantage whitening
  3. update    ppo_epochs passes over shuffled minibatches: clipped surrogate + clipped value loss
  4. log       RM score, the panel's gold score, KL to the reference (k1 and k3), PPO diagnostics
Every eval_interval iterations: held-out prompts (plays never trained on), gold score, RM score, KL, and
win rate against the SFT model's replies; a checkpoint; the plot. At the end: a report comparing SFT and
PPO replies on held-out prompts (out/ppo_report.json, out/ppo_report.md) and out/ppo_curves.png.

Four models: the policy (trained, starts as the SFT model), the reference (frozen SFT model), the reward
model (frozen), and the critic (trained, starts as the reward model). All run with dropout off.

What it simplifies: one reply per prompt, a single-turn prompt, one reward at the end of each reply
(no per-sentence rewards), no reward whitening or clipping, policy and critic stepped by one optimizer.
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

from model import EOT, format_prompt, get_tokenizer, load_checkpoint, param_groups, parse_settings, save_checkpoint
from ppo import (AdaptiveKLController, FixedKLController, apply_no_eos_penalty, explained_variance, fused, gae, kl_k1,
                 kl_k3, per_token_rewards, ppo_loss, response_logprobs, response_values, whiten)
from reward import GOLD_EPS, Panel, RewardModel
from sample import decode_replies, generate, load_model


@dataclass
class Settings:
    preset: str = "auto"             # auto | cpu | gpu: device-sized defaults (table below); explicit flags win
    out_dir: str = "out"             # reads sft.pt and rm.pt (trains them first if missing), writes ppo.pt
    seed: int = 1337                 # seeds prompt order and sampling
    sft_args: str = ""               # extra flags for train_sft.py when sft.pt is missing, e.g. "--max_iters 50"
    rm_args: str = ""                # extra flags for train_rm.py when rm.pt is missing
    # rollouts
    iters: int = 60                  # PPO iterations (one rollout batch + its update each)
    batch_size: int = 64             # prompts (episodes) per rollout
    max_new_tokens: int = 48         # reply length budget
    # reward: RM score at the last token, minus beta * KL(policy || frozen SFT reference) on every token
    init_kl_coef: float = 0.05       # beta at the start
    adaptive_kl: bool = True         # adapt beta towards kl_target (Ziegler et al. 2019); false: beta fixed
    kl_target: float = 4.0           # target KL per reply, in nats, for the adaptive controller
    kl_horizon: int = 300            # episodes over which the controller closes the gap (smaller = faster)
    no_eos_penalty: float = -2.0     # score given to a reply that never emits <|endoftext|> (normalised RM units)
    # PPO update
    ppo_epochs: int = 4              # passes over each rollout batch
    minibatch_size: int = 16         # episodes per gradient step
    lr: float = 3e-4                 # policy learning rate (Adam)
    critic_lr: float = 1e-4          # critic learning rate
    clip_eps: float = 0.2            # §4.2.2 ratio clip: the ratio is kept in [1 - eps, 1 + eps]
    vf_clip: float = 0.2             # value clip around the rollout's values
    vf_coef: float = 0.5             # weight of the value loss
    ent_coef: float = 0.0            # entropy bonus weight
    gamma: float = 1.0               # discount; 1 = the episode is one short reply
    lam: float = 0.95                # §4.2.3 GAE lambda: bias (0) vs variance (1) of the advantage
    whiten_advantages: bool = True   # normalise advantages to mean 0, std 1 over the batch's valid tokens
    grad_clip: float = 1.0           # clip the global gradient norm (0 = off)
    # evaluation
    eval_interval: int = 10          # held-out evaluation, checkpoint and plot every this many iterations
    n_eval: int = 128                # held-out prompts in the periodic evaluation
    n_report: int = 256              # held-out prompts in the final report
    resume: bool = False             # continue from out_dir/ppo.pt
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "float32"           # float32 | bfloat16 autocast (fast on CUDA; works on a CPU, slowly)
    compile: bool = False            # torch.compile the forward passes, GAE and the loss (gpu preset)


PRESETS = {
    "cpu": dict(batch_size=32, n_eval=64, n_report=200, eval_interval=15),
    "gpu": dict(iters=150, batch_size=256, max_new_tokens=64, minibatch_size=64, n_eval=256, n_report=512,
                eval_interval=15, dtype="bfloat16", compile=True),
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
    paths = {name: os.path.join(s.out_dir, f"{name}.pt") for name in ("sft", "rm", "ppo")}

    # ---- the pipeline: train what is missing --------------------------------------------------------------
    if not os.path.exists(paths["sft"]):
        print(f"{paths['sft']} is missing: running train_sft.py first", flush=True)
        import train_sft
        train_sft.main(["--out_dir", s.out_dir, "--preset", s.preset] + s.sft_args.split())
    if not os.path.exists(paths["rm"]):
        print(f"{paths['rm']} is missing: running train_rm.py first", flush=True)
        import train_rm
        train_rm.main(["--out_dir", s.out_dir, "--preset", s.preset] + s.rm_args.split())
    t_ppo = time.time()

    # ---- four models ---------------------------------------------------------------------------------------
    policy, _ = load_model(paths["sft"], device=device)        # trained
    ref, _ = load_model(paths["sft"], device=device)           # frozen: the KL penalty is measured against it
    rm_ckpt = load_checkpoint(paths["rm"], made_by="train_rm.py")
    rm = RewardModel.from_checkpoint(rm_ckpt).to(device)       # frozen
    critic = RewardModel.from_checkpoint(rm_ckpt).to(device)   # trained (starts as the reward model, see build_ctx)
    ctx = build_ctx(s, enc, device, policy, ref, rm, critic)
    optimizer = ctx["optimizer"]
    kl_ctl = AdaptiveKLController(s.init_kl_coef, s.kl_target, s.kl_horizon) if s.adaptive_kl else FixedKLController(s.init_kl_coef)
    panel = Panel(preference=rm_ckpt.get("config", {}).get("preference", "kind"))
    print(f"models: policy/reference {policy.num_params() / 1e6:.2f}M params, reward model and critic "
          f"{rm.body.num_params() / 1e6:.2f}M + head; panel preference: {panel.preference}")

    # ---- prompts: training plays for rollouts, held-out plays for evaluation ---------------------------------
    from data.prepare import load_turns
    train_prompts = unique_prompts(load_turns("train"), None, s.seed)
    eval_prompts = unique_prompts(load_turns("test"), s.n_eval, s.seed + 1)
    eval_sft = sample_texts(ctx, ref, eval_prompts, seed=s.seed + 2)   # SFT replies to compare against, once

    start_iter, history = 0, []
    if s.resume:
        ck = load_checkpoint(paths["ppo"], made_by="train_ppo.py")
        policy.load_state_dict(ck["model"])
        critic.load_state_dict(ck["critic"])
        optimizer.load_state_dict(ck["optimizer"])
        kl_ctl.value, start_iter, history = ck["kl_coef"], ck["iter"], ck["history"]
        torch.set_rng_state(ck["rng"])
        print(f"resuming from {paths['ppo']} at iteration {start_iter}")

    def save(it):
        save_checkpoint({"model": policy.state_dict(), "model_args": asdict(policy.config), "critic": critic.state_dict(),
                         "optimizer": optimizer.state_dict(), "kl_coef": kl_ctl.value, "iter": it, "history": history,
                         "config": asdict(s), "kind": "ppo", "rng": torch.get_rng_state()}, paths["ppo"])
        plot(history, os.path.join(s.out_dir, "ppo_curves.png"))

    # ---- the loop ----------------------------------------------------------------------------------------------
    order = random.Random(s.seed).sample(range(len(train_prompts)), len(train_prompts))
    for it in range(start_iter, s.iters):
        t0 = time.time()
        batch_prompts = [train_prompts[order[(it * s.batch_size + j) % len(order)]] for j in range(s.batch_size)]
        roll = rollout(ctx, batch_prompts)                                     # 1.
        t1 = time.time()
        b = score(ctx, roll, kl_ctl.value)                                     # 2.
        t2 = time.time()
        stats = update(ctx, b)                                                 # 3.
        t3 = time.time()
        kl_ctl.update(b["kl_per_reply"], s.batch_size)
        replies = decode_replies(enc, roll["seq"], roll["resp_mask"])
        row = {"iter": it + 1, "rm_score": b["scores"].mean().item(), "gold": float(np.mean(panel.golds(replies))),
               "kl": b["kl_per_reply"], "kl_k3": b["kl_k3_per_reply"], "beta": b["beta"], "reply_len": b["reply_len"],
               "ended": b["ended"], **stats, "t_gen": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2}
        history.append(row)                                                    # 4.
        print(f"iter {it + 1:3d}/{s.iters} | rm {row['rm_score']:+.3f} | gold {row['gold']:+.3f} | KL {row['kl']:.2f} nats "
              f"(k3 {row['kl_k3']:.2f}) | beta {row['beta']:.3f} | len {row['reply_len']:.1f} | ended {row['ended']:.0%} | "
              f"pg {stats['pg_loss']:+.3f} vf {stats['vf_loss']:.3f} | clip {stats['clipfrac']:.2f} | "
              f"approx_kl {stats['approx_kl']:.3f} | H {stats['entropy']:.2f} | EV {stats['explained_var']:+.2f} | "
              f"{t3 - t0:.1f}s (gen {t1 - t0:.1f} / score {t2 - t1:.1f} / update {t3 - t2:.1f})", flush=True)
        if (it + 1) % s.eval_interval == 0 or it + 1 == s.iters:
            ev = evaluate(ctx, panel, eval_prompts, eval_sft, seed=s.seed + 3)
            history.append({"iter": it + 1, **{"eval_" + k: v for k, v in ev.items()}})
            print(f"eval   {it + 1:3d} | held-out: rm {ev['rm_score']:+.3f} | gold {ev['gold']:+.3f} (SFT {ev['gold_sft']:+.3f}) | "
                  f"KL {ev['kl']:.2f} nats | win rate vs SFT {ev['win_rate']:.1%}", flush=True)
            save(it + 1)
    if start_iter >= s.iters:
        print(f"{paths['ppo']} has already run {start_iter} of {s.iters} iterations; writing the report only")

    # ---- the final report: SFT vs PPO on held-out prompts --------------------------------------------------------
    report_prompts = unique_prompts(load_turns("test"), s.n_report, s.seed + 4)
    sft_texts = sample_texts(ctx, ref, report_prompts, seed=s.seed + 5)
    rep = evaluate(ctx, panel, report_prompts, sft_texts, seed=s.seed + 6, keep_texts=True)
    rep.update(minutes_total=(time.time() - t_start) / 60, minutes_ppo=(time.time() - t_ppo) / 60, device=device,
               iters=s.iters, preset=s.preset)
    write_report(rep, os.path.join(s.out_dir, "ppo_report"))
    print(f"\nfinal report on {len(report_prompts)} held-out prompts (plays never trained on), replies sampled at temperature 1:")
    print(f"  reward-model score  SFT {rep['rm_score_sft']:+.3f} -> PPO {rep['rm_score']:+.3f}")
    print(f"  panel gold score    SFT {rep['gold_sft']:+.3f} -> PPO {rep['gold']:+.3f}")
    print(f"  KL(PPO || SFT)      {rep['kl']:.2f} nats per reply (k3 estimate {rep['kl_k3']:.2f})")
    print(f"  win rate vs SFT     {rep['win_rate']:.1%} (gold; ties count half)   panel vote {rep['vote_rate']:.1%}")
    for p, a, c in rep["examples"][:4]:
        print(f"\n  Human: {p}\n    SFT: {a}\n    PPO: {c}")
    print(f"\ndone in {rep['minutes_total']:.1f} min (PPO {rep['minutes_ppo']:.1f} min): {paths['ppo']}, "
          f"{os.path.join(s.out_dir, 'ppo_report.md')}, {os.path.join(s.out_dir, 'ppo_curves.png')}")
    return rep


def build_ctx(s, enc, device, policy, ref, rm, critic):
    """Everything the three steps below need, in one dict: the four models set up for PPO, the optimizer,
    autocast, and the GAE and loss functions (compiled with --compile)."""
    # The critic starts as the reward model: its features already tell good replies from bad ones, and its
    # value at the last token is the (normalised) score itself, so early value estimates are sensible and
    # advantages are not noise while a fresh value head would learn. The normalisation is folded into the
    # head so the critic's output is in the same units as the rewards it predicts.
    with torch.no_grad():
        critic.head.weight /= rm.reward_std
        critic.head.bias.sub_(rm.reward_mean).div_(rm.reward_std)
    critic.reward_mean, critic.reward_std = 0.0, 1.0
    for m in (policy, ref, rm, critic):
        m.eval()                                               # dropout off everywhere, also while training
        m.requires_grad_(m is policy or m is critic)
    optimizer = torch.optim.Adam([{"params": list(policy.parameters()), "lr": s.lr},
                                  {"params": list(critic.parameters()), "lr": s.critic_lr}],
                                 fused=torch.device(device).type == "cuda")    # one kernel for all parameters
    if s.compile:  # fused kernels: each model's forward, GAE and the PPO loss
        for m in (policy, ref, rm, critic):
            body = m.body if isinstance(m, RewardModel) else m
            body.hidden_states = torch.compile(body.hidden_states, dynamic=True)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")
    return dict(s=s, enc=enc, device=device, autocast=autocast, policy=policy, ref=ref, rm=rm, critic=critic,
                optimizer=optimizer, gae=fused(gae) if s.compile else gae, loss_fn=fused(ppo_loss) if s.compile else ppo_loss)


# ---- 1. rollout -------------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(ctx, prompts, model=None, generator=None):
    """The policy replies to each prompt by pure sampling. Returns seq (B, P+R), pad (B,), resp_mask (B, R)."""
    s, enc = ctx["s"], ctx["enc"]
    ids = [enc.encode_ordinary(format_prompt(p)) for p in prompts]
    with ctx["autocast"]:  # bf16 with --dtype bfloat16; the sampling itself is done in float32 (sample.filter_logits)
        seq, pad, resp_mask = generate(model or ctx["policy"], ids, s.max_new_tokens, temperature=1.0, generator=generator)
    return {"seq": seq, "pad": pad, "resp_mask": resp_mask}


# ---- 2. score: rewards, advantages --------------------------------------------------------------------------------

@torch.no_grad()
def score(ctx, roll, beta):
    s, autocast = ctx["s"], ctx["autocast"]
    seq, pad, resp_mask = roll["seq"], roll["pad"], roll["resp_mask"]         # (B, P+R), (B,), (B, R)
    B, R = resp_mask.shape
    P = seq.size(1) - R
    n_valid = resp_mask.sum(1)                                                # (B,) reply tokens incl. EOT
    last = P + n_valid - 1                                                    # (B,) index of each reply's last token
    ended = seq[torch.arange(B), last] == EOT                                 # (B,) emitted <|endoftext|>
    with autocast:
        logprobs = response_logprobs(ctx["policy"], seq, pad, R, resp_mask=resp_mask)   # (B, R) log pi_old(a_t | s_t)
        ref_logprobs = response_logprobs(ctx["ref"], seq, pad, R, resp_mask=resp_mask)  # (B, R) log pi_ref(a_t | s_t)
        values = response_values(ctx["critic"], seq, pad, R).float()          # (B, R) V(s_t)
        scores = ctx["rm"].score(seq, last, pad).float()                      # (B,) normalised RM score
    scores = apply_no_eos_penalty(scores, ended, s.no_eos_penalty)            # (B,)
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, resp_mask, beta)  # (B, R) each
    advantages, returns = ctx["gae"](rewards, values, resp_mask, s.gamma, s.lam)      # (B, R) each, §4.2.3
    if s.whiten_advantages:
        advantages = whiten(advantages, resp_mask)                            # (B, R)
    return {"seq": seq, "pad": pad, "resp_mask": resp_mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
            "advantages": advantages, "returns": returns, "scores": scores, "beta": beta,
            "kl_per_reply": kl.sum(1).mean().item(),                          # k1 summed over each reply's tokens
            "kl_k3_per_reply": torch.where(resp_mask, kl_k3(logprobs, ref_logprobs), 0.0).sum(1).mean().item(),
            "reply_len": n_valid.float().mean().item(), "ended": ended.float().mean().item()}


# ---- 3. update: PPO epochs over shuffled minibatches ------------------------------------------------------------------

def update(ctx, b):
    s, policy, critic, optimizer, autocast = ctx["s"], ctx["policy"], ctx["critic"], ctx["optimizer"], ctx["autocast"]
    B, R = b["resp_mask"].shape
    sums, n = {}, 0
    for epoch in range(s.ppo_epochs):
        for mb in torch.randperm(B).split(s.minibatch_size):                 # mb: (M,) episode indices
            mb_seq, mb_pad, mb_mask = b["seq"][mb], b["pad"][mb], b["resp_mask"][mb]
            with autocast:
                mb_logprobs, mb_entropy = response_logprobs(policy, mb_seq, mb_pad, R, with_entropy=True,
                                                            resp_mask=mb_mask)  # (M, R) x2
                mb_values = response_values(critic, mb_seq, mb_pad, R).float()                            # (M, R)
            loss, stats = ctx["loss_fn"](mb_logprobs, b["logprobs"][mb], b["advantages"][mb], mb_values,
                                         b["values"][mb], b["returns"][mb], mb_mask, clip_eps=s.clip_eps,
                                         vf_clip=s.vf_clip, vf_coef=s.vf_coef, entropy=mb_entropy, ent_coef=s.ent_coef)
            if not torch.isfinite(loss):
                sys.exit(f"error: PPO loss is {loss.item()}; lower --lr or raise the KL coefficient. "
                         "The last good checkpoint is out_dir/ppo.pt (if one was saved).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(critic.parameters()), s.grad_clip)
            optimizer.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    out = {k: v / n for k, v in sums.items()}
    out["explained_var"] = explained_variance(b["values"], b["returns"], b["resp_mask"]).item()
    return out


# ---- evaluation ---------------------------------------------------------------------------------------------------------

def sample_texts(ctx, model, prompts, seed, batch=128):
    gen = torch.Generator(device=ctx["device"]).manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), batch):
        roll = rollout(ctx, prompts[i:i + batch], model=model, generator=gen)
        texts += decode_replies(ctx["enc"], roll["seq"], roll["resp_mask"])
    return texts


@torch.no_grad()
def evaluate(ctx, panel, prompts, sft_texts, seed, batch=128, keep_texts=False):
    """Held-out prompts: the policy replies (temperature 1); RM score, gold score, KL to the reference, and the
    panel's verdict against the SFT model's replies to the same prompts."""
    enc, s = ctx["enc"], ctx["s"]
    gen = torch.Generator(device=ctx["device"]).manual_seed(seed)
    texts, rm_scores, kls, kl3s = [], [], [], []
    for i in range(0, len(prompts), batch):
        roll = rollout(ctx, prompts[i:i + batch], generator=gen)
        b = score(ctx, roll, beta=0.0)
        texts += decode_replies(enc, roll["seq"], roll["resp_mask"])
        rm_scores += b["scores"].tolist()
        mask = roll["resp_mask"]
        kls += torch.where(mask, kl_k1(b["logprobs"], b["ref_logprobs"]), 0.0).sum(1).tolist()   # nats per reply
        kl3s += torch.where(mask, kl_k3(b["logprobs"], b["ref_logprobs"]), 0.0).sum(1).tolist()
    gold, gold_sft = panel.golds(texts), panel.golds(sft_texts)
    wins = np.where(np.abs(gold - gold_sft) < GOLD_EPS, 0.5, (gold > gold_sft).astype(float))  # gold verdict, ties half
    votes = [panel.vote(a, c) for a, c in zip(sft_texts, texts)]                 # P(a random rater prefers PPO)
    rm_sft = score_texts(ctx, prompts, sft_texts, batch)
    out = {"rm_score": float(np.mean(rm_scores)), "rm_score_sft": float(np.mean(rm_sft)), "gold": float(np.mean(gold)),
           "gold_sft": float(np.mean(gold_sft)), "kl": float(np.mean(kls)), "kl_k3": float(np.mean(kl3s)),
           "win_rate": float(np.mean(wins)), "vote_rate": float(np.mean(votes)), "n": len(prompts)}
    if keep_texts:
        out["examples"] = list(zip(prompts, sft_texts, texts))
    return out


@torch.no_grad()
def score_texts(ctx, prompts, texts, batch=128):
    """Normalised RM scores of given replies (used for the SFT side of the comparison)."""
    from reward import batch_replies
    enc, rm, out = ctx["enc"], ctx["rm"], []
    for i in range(0, len(prompts), batch):
        idx, pad, last = batch_replies(enc, [enc.encode_ordinary(format_prompt(p)) for p in prompts[i:i + batch]],
                                       [enc.encode_ordinary(" " + t.strip()) + [EOT] for t in texts[i:i + batch]],
                                       rm.body.config.block_size)
        with ctx["autocast"]:
            out += rm.score(idx.to(ctx["device"]), last.to(ctx["device"]), pad.to(ctx["device"])).float().tolist()
    return out


def unique_prompts(turns, n, seed):
    prompts = sorted({t["prompt"] for t in turns})
    random.Random(seed).shuffle(prompts)
    return prompts if n is None else prompts[:n]


def write_report(rep, stem):
    with open(stem + ".json.tmp", "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    lines = [f"# PPO vs SFT on {rep['n']} held-out prompts ({rep['device']}, preset {rep['preset']}, {rep['iters']} iterations)", "",
             "| | SFT | PPO |", "|---|---|---|",
             f"| reward-model score (normalised) | {rep['rm_score_sft']:+.3f} | {rep['rm_score']:+.3f} |",
             f"| panel gold score | {rep['gold_sft']:+.3f} | {rep['gold']:+.3f} |", "",
             f"KL(PPO || SFT) per reply: {rep['kl']:.2f} nats (k3 estimate {rep['kl_k3']:.2f}).  ",
             f"Win rate of PPO over SFT (panel gold, ties half): {rep['win_rate']:.1%}; panel vote: {rep['vote_rate']:.1%}.  ",
             f"Time: {rep['minutes_total']:.1f} min in all, PPO {rep['minutes_ppo']:.1f} min.", "", "## Examples", ""]
    for p, a, c in rep["examples"][:12]:
        lines += [f"**Human:** {p}  ", f"**SFT:** {a}  ", f"**PPO:** {c}", ""]
    with open(stem + ".md.tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(stem + ".md.tmp", stem + ".md")


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [h for h in history if "rm_score" in h]
    ev = [h for h in history if "eval_rm_score" in h]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("rm_score", "reward-model score (normalised)"), ("gold", "panel gold score"),
              ("kl", "KL(policy || SFT), nats per reply"), ("vf_loss", "value loss")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([h["iter"] for h in tr], [h[key] for h in tr], label="training rollouts")
        if ev and "eval_" + key in ev[0]:
            ax.plot([h["iter"] for h in ev], [h["eval_" + key] for h in ev], "o-", label="held-out prompts")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PPO: proxy (reward model) vs gold (panel); divergence = over-optimisation")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
