"""
RLHF with PPO: teach the Bard kindness ([实战框架 §4.2] PPO 算法: [实战框架 §4.2.1] 重要性采样,
[实战框架 §4.2.2] 信赖域方法 (the clip), [实战框架 §4.2.3] 广义优势估计 (GAE); [实战框架 §3.3] 策略优化过程:
[实战框架 §3.3.2] the rollout, [实战框架 §3.3.3] the update).

    python train_ppo.py                  # the whole pipeline: sft -> rm -> ppo, each trained if missing
    python train_ppo.py --init_kl_coef 0 --adaptive_kl false --out_dir out/beta0   # over-optimisation
    python train_ppo.py --resume         # continue out/ppo.pt
    python train_ppo.py --help

Each iteration, top to bottom (one function each, below main()):
  1. rollout   the policy replies to a batch of training prompts by pure sampling (temperature 1, no top-k/p)
  2. score     RM score; log-probs under the policy and the frozen SFT reference; values; shape_rewards; GAE
  3. update    ppo_epochs passes over shuffled minibatches: clipped surrogate + clipped value loss
  4. log       RM score, the panel's gold score, KL to the reference (k1 and k3), PPO diagnostics
Every eval_interval iterations: SFT and PPO replies to held-out prompts judged by the same path, a checkpoint,
the plots. At the end: out/ppo_report.json and .md, out/ppo_curves.png, out/overoptimisation.png.
Four models, all with dropout off: the policy (trained, starts as the SFT model), the reference (the frozen
SFT model), the frozen reward model, the critic (trained, starts as the reward model).

What it simplifies: one reply per prompt, a single-turn prompt, one reward at the end of each reply, no
reward whitening, policy and critic stepped by one optimizer (their gradient norm clipped together).
"""
if __name__ == "__main__":    # Ctrl-C while the imports below load (a second or two): one line, status 130
    import os
    import signal
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted (Ctrl-C) while starting\n"),
                                             os._exit(130)))
import contextlib
import importlib
import json
import os
import random
import shlex
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from data.prepare import EOT, get_tokenizer, load_turns, real_word_rate, unique_prompts, words
from model import GPT, clip_and_step, with_positions
from data.plumbing import (World, all_sum, end_world, file_sha256, flag, gather_shards, last_good,
                           load_checkpoint, nested_settings, pyplot, run_script, save_checkpoint, save_figure,
                           start_run, weights_problem, world_size, write_text)
from ppo import (AdaptiveKLController, FixedKLController, apply_no_eos_penalty,
                 explained_variance, fused, gae, kl_k3, per_token_rewards, ppo_loss, response_logprobs,
                 response_values, whiten)
from data.panel import GOLD_EPS, TEMPERATURE, Panel
from reward import RewardModel
from sample import decode_replies, encode_prompt, generate, load_model


@dataclass
class Settings:
    preset: str = flag("auto", "auto | cpu | gpu", "device-sized defaults (table below); explicit flags win")
    out_dir: str = flag("out", "", "reads sft.pt and rm.pt (trains them first if missing), writes ppo.pt")
    seed: int = flag(1337, ">= 0", "seeds prompt order and sampling")
    sft_args: str = flag("", "",
                         "extra flags for train_sft.py when sft.pt is missing, e.g. \"--max_iters 50\"")
    rm_args: str = flag("", "", "extra flags for train_rm.py when rm.pt is missing")
    # rollouts
    iters: int = flag(80, ">= 1", "PPO iterations (one rollout batch + its update each)")
    batch_size: int = flag(64, ">= 1", "prompts (episodes) per rollout")
    max_new_tokens: int = flag(48, ">= 1", "reply length budget")
    # reward: RM score at the last token, minus beta * KL(policy || frozen SFT reference) on every token
    init_kl_coef: float = flag(0.1, ">= 0", "beta at the start")
    adaptive_kl: bool = flag(True, "",
                             "adapt beta towards kl_target (Ziegler et al. 2019); false: beta fixed")
    kl_target: float = flag(8.0, "> 0", "target KL per reply, in nats, for the adaptive controller")
    kl_horizon: int = flag(100, ">= 1",
                           "episodes over which the controller closes the gap (smaller = faster)")
    no_eos_penalty: float = flag(-2.0, "",
                                 "score of a reply that never emits <|endoftext|> (normalised RM units)")
    score_clip: float = flag(3.0, "(0, inf]",
                             "the RM score is clipped to +-this (normalised units; inf = off)")
    # PPO update
    ppo_epochs: int = flag(4, ">= 1", "passes over each rollout batch")
    minibatch_size: int = flag(16, ">= 1", "episodes per gradient step")
    lr: float = flag(1e-4, "> 0", "policy learning rate (Adam)")
    critic_lr: float = flag(1e-4, "> 0", "critic learning rate")
    clip_eps: float = flag(0.2, "(0, inf]",
                           "[实战框架 §4.2.2] ratio clip: ratio kept in [1 - eps, 1 + eps] (inf = off)")
    vf_clip: float = flag(0.2, "(0, inf]", "value clip around the rollout's values (inf = off)")
    vf_coef: float = flag(0.5, ">= 0", "weight of the value loss")
    ent_coef: float = flag(0.0, ">= 0", "entropy bonus weight")
    gamma: float = flag(1.0, "(0, 1]", "discount; 1 = the episode is one short reply")
    lam: float = flag(0.95, "[0, 1]", "[实战框架 §4.2.3] GAE lambda: bias (0) vs variance (1) of the advantage")
    whiten_advantages: bool = flag(True, "",
                                   "normalise advantages to mean 0, std 1 over the batch's valid tokens")
    grad_clip: float = flag(1.0, ">= 0", "clip the global gradient norm (0 = off)")
    # evaluation
    eval_interval: int = flag(10, ">= 1",
                              "held-out evaluation, checkpoint and plots every this many iterations")
    n_eval: int = flag(128, ">= 1", "held-out prompts in the periodic evaluation")
    n_report: int = flag(256, ">= 1", "held-out prompts in the final report")
    compare_with: str = flag("", "", "other runs' out_dirs, comma-separated, drawn in overoptimisation.png")
    resume: bool = flag(False, "", "continue from out_dir/ppo.pt")
    device: str = flag("auto", "", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("float32", "float32 | bfloat16", "autocast dtype (fast on CUDA; slow on a CPU)")
    compile: bool = flag(False, "", "torch.compile the forward passes, GAE and the loss (gpu preset)")


PRESETS = {
    "cpu": dict(batch_size=32, n_eval=64, n_report=200),
    "gpu": dict(iters=150, batch_size=256, max_new_tokens=64, minibatch_size=64, n_eval=256, n_report=512,
                kl_horizon=800, eval_interval=15, dtype="bfloat16", compile=True),   # 256/800: cpu's 32/100
}


@dataclass
class Models:
    """What the three steps of an iteration work with (built once by setup())."""
    s: Settings                      # the settings of the run
    enc: object                      # the tokenizer (data.prepare.get_tokenizer())
    device: str                      # "cpu" or "cuda"
    autocast: object                 # torch.autocast context: bf16 with --dtype bfloat16, else a no-op
    policy: GPT                      # trained; starts as the SFT model
    ref: GPT                         # frozen SFT model: the KL penalty is measured against it
    rm: RewardModel                  # frozen reward model: the score of a whole reply
    critic: RewardModel              # trained; V(s_t) at every reply position, starts as the reward model
    optimizer: torch.optim.Optimizer  # Adam over the policy's and the critic's parameters
    gae: Callable                    # ppo.gae, compiled with --compile
    ppo_loss: Callable               # ppo.ppo_loss, compiled with --compile
    actor_critic: torch.nn.Module  # ActorCritic(policy, critic): what update() runs (in DDP under torchrun)
    world: World                     # this process's rank among the processes of the run (torchrun)
    started_from: dict = None        # the sha256 of sft.pt and rm.pt (setup()): ppo.pt records them


class ActorCritic(torch.nn.Module):
    """The two models PPO trains ([流程与实践 §4.3] Actor-Critic算法: the policy and its value function) as one
    module, so that one DDP wrapper averages both models' gradients under torchrun."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, seq, pad, resp_mask):
        R = resp_mask.size(1)
        logprobs, entropy = response_logprobs(self.policy, seq, pad, R, with_entropy=True,
                                              resp_mask=resp_mask)
        values = response_values(self.critic, seq, pad, R).float()
        return logprobs, entropy, values                                      # (M, R) each


@dataclass
class Rollout:
    """Replies sampled for a batch of prompts (sample.generate's outputs)."""
    seq: torch.Tensor                # (B, P+R) left-padded prompts, then the R reply tokens
    pad: torch.Tensor                # (B,) pad tokens at the start of each row
    resp_mask: torch.Tensor          # (B, R) True on reply tokens up to and including the first <|endoftext|>


@dataclass
class Experience:
    """A scored rollout: everything update() learns from. Per-token tensors are (B, R), 0 where masked."""
    roll: Rollout
    logprobs: torch.Tensor           # (B, R) log pi_old(a_t | s_t): the policy that sampled the rollout
    ref_logprobs: torch.Tensor       # (B, R) log pi_ref(a_t | s_t): the frozen SFT model
    values: torch.Tensor             # (B, R) V(s_t), the critic before the update
    rm_scores: torch.Tensor          # (B,) the reward model's normalised score of each reply
    ended: torch.Tensor              # (B,) bool: the reply emitted <|endoftext|> within the budget
    rewards: torch.Tensor            # (B, R) shape_rewards(): what PPO maximises, summed over a reply
    kl: torch.Tensor                 # (B, R) k1 = log pi - log pi_ref per token
    advantages: torch.Tensor         # (B, R) GAE advantages (whitened if whiten_advantages)
    returns: torch.Tensor            # (B, R) lambda-returns: the critic's targets
    beta: float                      # the KL coefficient the rewards were shaped with


def problems(s):
    """The rules that tie settings together (each field's own range is in Settings); each names its flag."""
    out = []
    if s.minibatch_size > s.batch_size:
        out.append(f"--minibatch_size {s.minibatch_size} is larger than --batch_size {s.batch_size}")
    if s.batch_size % world_size() or s.minibatch_size % world_size():
        out.append(f"--batch_size {s.batch_size} and --minibatch_size {s.minibatch_size} must be multiples "
                   f"of the {world_size()} processes: each process rolls out and trains on its share of both")
    sft_path = os.path.join(s.out_dir, "sft.pt")
    block = None
    if os.path.isfile(sft_path):                         # the prompt and the reply share the context window
        with contextlib.suppress(Exception):             # a bad sft.pt gets its own message in setup()
            block = torch.load(sft_path, map_location="cpu", weights_only=True)["model_args"]["block_size"]
    elif not os.path.exists(sft_path):                   # train_sft.py runs first, with --sft_args
        import train_sft
        sft, bad = nested_settings("--sft_args", train_sft, s.sft_args, s.out_dir, s.preset)
        out += bad
        block, sft_path = (sft.block_size if sft else None), sft_path + " (to be trained)"
    if not os.path.exists(os.path.join(s.out_dir, "rm.pt")):
        import train_rm
        out += nested_settings("--rm_args", train_rm, s.rm_args, s.out_dir, s.preset)[1]
    if block and s.max_new_tokens > block // 2:
        out.append(f"--max_new_tokens {s.max_new_tokens} is more than half of the context window "
                   f"({block} tokens) of {sft_path}: the prompt needs the other half")
    ppo_path = os.path.join(s.out_dir, "ppo.pt")
    if s.resume and not os.path.exists(ppo_path):
        out.append(f"--resume: {ppo_path} does not exist (run without --resume to start one)")
    for d in filter(None, s.compare_with.split(",")):                      # drawn at the end: read them now
        try:
            load_checkpoint(os.path.join(d, "ppo.pt"), made_by="train_ppo.py", kind="ppo")
        except (OSError, ValueError) as e:
            out.append(f"--compare_with: {e}")
    return out


def main(argv=None):
    s, w, device = start_run(Settings, PRESETS, argv, __doc__, problems)     # w: this process (torchrun)
    t_start = time.time()
    paths = {name: os.path.join(s.out_dir, f"{name}.pt") for name in ("sft", "rm", "ppo")}
    train_missing(s, paths)
    torch.manual_seed(s.seed + w.rank)                                  # each process samples its own replies
    t_ppo = time.time()

    m, panel, kl_ctl = setup(s, device, paths, w)     # the four models; the judge; beta (the KL coefficient)

  # ---- prompts: training plays for rollouts, held-out plays for evaluation ---------------------------------
    train_prompts = unique_prompts(load_turns("train"), None, s.seed)
    eval_prompts = unique_prompts(load_turns("test"), s.n_eval, s.seed + 1)
    eval_sft = judge(m, panel, m.ref, eval_prompts, seed=s.seed + 2)          # SFT replies, judged once

    start_iter, history = resume(s, m, kl_ctl, paths["ppo"]) if s.resume else (0, [])

    # ---- the loop ------------------------------------------------------------------------------------------
    shuffled = random.Random(s.seed).sample(train_prompts, len(train_prompts))
    for it in range(start_iter, s.iters):
        t0 = time.time()
        batch_prompts = [shuffled[(it * s.batch_size + j) % len(shuffled)] for j in range(s.batch_size)]
        roll = rollout(m, m.policy, w.shard(batch_prompts))                    # 1. this process's share
        t1 = time.time()
        exp = score(m, roll, kl_ctl.value)                                     # 2.
        t2 = time.time()
        try:
            stats = update(m, exp)                                             # 3.
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at iteration {it + 1}. {last_good(paths['ppo'])}") from None
        t3 = time.time()
        row = log_row(it + 1, exp, stats, panel, m.enc, (t1 - t0, t2 - t1, t3 - t2))   # 4.
        kl_ctl.update(row["kl"], s.batch_size)
        history.append(row)
        print_row(row, s.iters)
        if (it + 1) % s.eval_interval == 0 or it + 1 == s.iters:
            ev = compare(judge(m, panel, m.policy, eval_prompts, seed=s.seed + 3), eval_sft, panel)
            history.append({"iter": it + 1, **{"eval_" + k: v for k, v in ev.items()}})
            print_eval(it + 1, ev)
            save(s, m, kl_ctl, it + 1, history, paths["ppo"])
    if start_iter >= s.iters:
        print(f"{paths['ppo']} has already run {start_iter} of {s.iters} iterations; writing the report only")

    rep = final_report(s, m, panel, history, device, t_start, t_ppo)
    print(f"\ndone in {rep['minutes_total']:.1f} min (PPO {rep['minutes_ppo']:.1f} min): {paths['ppo']}, "
          f"{os.path.join(s.out_dir, 'ppo_report.md')}, {os.path.join(s.out_dir, 'ppo_curves.png')}, "
          f"{os.path.join(s.out_dir, 'overoptimisation.png')}")
    end_world()
    return rep


def print_eval(it, ev):
    print("eval   {it:3d} | held-out: rm {rm_score:+.3f} (SFT {rm_score_sft:+.3f}) | gold {gold:+.3f} (SFT "
          "{gold_sft:+.3f}) | KL {kl:.2f} nats | win rate vs SFT {win_rate:.1%} | words {reply_words:.1f}, "
          "real {real_word_rate:.2f}".format(it=it, **ev), flush=True)


def resume(s, m, kl_ctl, path):
    """Continue a run from its ppo.pt (policy, critic, optimizer, beta, history, RNG), with the learning rates
    given now; refused if sft.pt or rm.pt is not the file it started from (their sha256 is in ppo.pt)."""
    ck = load_checkpoint(path, made_by="train_ppo.py", kind="ppo", resume=True)
    for key, digest in m.started_from.items():
        if ck.get(key, digest) != digest:
            name = key.removesuffix("_sha256") + ".pt"
            raise ValueError(f"--resume: {path} was trained with another {name} than "
                             f"{os.path.join(s.out_dir, name)} (sha256 {ck[key][:12]}... then, "
                             f"{digest[:12]}... now): resume with the files it started from, or start afresh "
                             "without --resume")
    m.policy.load_state_dict(with_positions(ck["model"], m.policy.config))         # with_positions: files
    m.critic.load_state_dict(with_positions(ck["critic"], m.policy.config, "body."))   # made before 12-02
    m.optimizer.load_state_dict(ck["optimizer"])
    for group, lr, name in zip(m.optimizer.param_groups, (s.lr, s.critic_lr), ("lr", "critic_lr")):
        if group["lr"] != lr:
            print(f"resume: {name} {group['lr']} -> {lr} (from the command line)")
        group["lr"] = lr
    kl_ctl.value = ck["kl_coef"]
    if ck["kl_coef"] != s.init_kl_coef:
        print(f"resume: beta = {ck['kl_coef']:.4g} from the checkpoint (--init_kl_coef starts new runs only)")
    torch.set_rng_state(ck["rng"])                                         # process 0's; the others their own
    if m.world.rank:
        torch.manual_seed(s.seed + m.world.rank + 1000 * ck["iter"])
    print(f"resuming from {path} at iteration {ck['iter']}")
    return ck["iter"], ck["history"]


def train_missing(s, paths):
    """The pipeline: train the SFT model and the reward model first if they are missing."""
    for name, args in (("sft", s.sft_args), ("rm", s.rm_args)):
        if not os.path.exists(paths[name]):
            print(f"{paths[name]} is missing: running train_{name}.py first", flush=True)
            importlib.import_module(f"train_{name}").main(["--out_dir", s.out_dir, "--preset", s.preset]
                                                          + shlex.split(args))


def setup(s, device, paths, world=World()):
    """The four models from sft.pt and rm.pt (Models); the panel that labelled rm.pt's data (the gold judge of
    every report); the controller of beta, the KL coefficient."""
    policy, _ = load_model(paths["sft"], device=device, kind="sft")
    ref, _ = load_model(paths["sft"], device=device, kind="sft")
    rm_ckpt = load_checkpoint(paths["rm"], made_by="train_rm.py", kind="rm")
    if not rm_ckpt.get("final", True):
        raise ValueError(f"{paths['rm']} is from a train_rm.py run that did not finish (its scores are not "
                         "normalised yet): finish it with `python train_rm.py --resume`")
    if rm_ckpt["model_args"]["block_size"] < policy.config.block_size:
        raise ValueError(f"{paths['rm']} reads {rm_ckpt['model_args']['block_size']} tokens, {paths['sft']} "
                         f"writes {policy.config.block_size}: the reward model must read every prompt and "
                         f"reply the policy writes; train it from this sft.pt (python train_rm.py)")
    if not rm_ckpt["reward_std"] > 1e-3:
        raise ValueError(f"{paths['rm']}'s scores hardly vary over SFT replies (std "
                         f"{rm_ckpt['reward_std']:.2g}): it cannot tell PPO which replies are better; "
                         "retrain it (python train_rm.py)")
    rm = RewardModel.from_checkpoint(rm_ckpt).to(device)
    critic = critic_from_reward_model(RewardModel.from_checkpoint(rm_ckpt).to(device))
    m = build_models(s, device, policy, ref, rm, critic, world)
    m.started_from = {f"{k}_sha256": file_sha256(paths[k]) for k in ("sft", "rm")}   # recorded in ppo.pt
    rater = rm_ckpt.get("config", {})
    panel = Panel(preference=rater.get("preference", "kind"),
                  temperature=rater.get("rater_temperature", TEMPERATURE))
    kl_ctl = AdaptiveKLController(s.init_kl_coef, s.kl_target, s.kl_horizon) if s.adaptive_kl \
        else FixedKLController(s.init_kl_coef)
    print(f"models: policy/reference {policy.num_params() / 1e6:.2f}M params, reward model and critic "
          f"{rm.body.num_params() / 1e6:.2f}M + head; panel preference: {panel.preference}")
    return m, panel, kl_ctl


def critic_from_reward_model(critic):
    """The critic starts as the reward model (its features already tell kind words from unkind ones), its head
    (head - reward_mean) / reward_std at every position: V(s_t) starts in the units of the rewards, not yet
    the value of the state (learnt from the returns). Exercise C6 tries a fresh head here."""
    with torch.no_grad():
        critic.head.weight /= critic.reward_std
        critic.head.bias.sub_(critic.reward_mean).div_(critic.reward_std)
    critic.reward_mean, critic.reward_std = 0.0, 1.0
    return critic


def build_models(s, device, policy, ref, rm, critic, world=World()):
    """Models from four modules: dropout off, only the policy and the critic trained, the optimizer, autocast,
    GAE and the loss (compiled with --compile); under torchrun the trained pair wrapped in DDP."""
    for module in (policy, ref, rm, critic):
        module.eval()                                          # dropout off everywhere, also while training
        module.requires_grad_(module is policy or module is critic)
        if s.compile:  # fused kernels: each model's forward (here), GAE and the PPO loss (below)
            body = module.body if isinstance(module, RewardModel) else module
            body.hidden_states = torch.compile(body.hidden_states, dynamic=True)
    optimizer = torch.optim.Adam([{"params": list(policy.parameters()), "lr": s.lr},
                                  {"params": list(critic.parameters()), "lr": s.critic_lr}],
                                 fused=torch.device(device).type == "cuda")    # one kernel for all parameters
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")
    actor_critic = world.wrap(ActorCritic(policy, critic))              # torchrun: DDP averages gradients
    return Models(s, get_tokenizer(), device, autocast, policy, ref, rm, critic, optimizer,
                  fused(gae) if s.compile else gae, fused(ppo_loss) if s.compile else ppo_loss, actor_critic,
                  world)


# ---- 1. rollout --------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(m, model, prompts, generator=None):
    """`model` (the policy, or the SFT reference for comparison) replies to each prompt by pure sampling."""
    ids = [encode_prompt(m.enc, p) for p in prompts]
    with m.autocast:  # bf16 with --dtype bfloat16; the sampling itself is in float32 (sample.filter_logits)
        seq, pad, resp_mask = generate(model, ids, m.s.max_new_tokens, temperature=1.0, generator=generator)
        return Rollout(seq, pad, resp_mask)


# ---- 2. score: the reward, advantages ----------------------------------------------------------------------
def shape_rewards(s, rm_scores, ended, logprobs, ref_logprobs, resp_mask, beta, replies):
    """The reward PPO maximises, per reply token (reward shaping, 奖励塑形: [流程与实践 §3.3] 反馈模型训练).
    Training and evaluation both call it, so what is added here is what the policy learns from and what the
    report measures, for SFT and PPO replies alike. The score is clipped to +-score_clip (far from its data
    the reward model's scores are large and wrong); a reply that never ended gets no_eos_penalty; then
    ppo.per_token_rewards. rm_scores, ended (B,); the rest (B, R); replies: the B texts, e.g. for exercise C3:
        repeats = torch.tensor([len(ws) - len(set(ws)) for ws in map(words, replies)])   # (B,)
        scores = scores - 0.5 * repeats.to(scores)
    Returns rewards (B, R), kl (B, R)."""
    scores = rm_scores.clamp(-s.score_clip, s.score_clip)                     # (B,)
    scores = apply_no_eos_penalty(scores, ended, s.no_eos_penalty)            # (B,)
    return per_token_rewards(scores, logprobs, ref_logprobs, resp_mask, beta)  # (B, R), (B, R)


@torch.no_grad()
def score(m, roll, beta, advantages=True):
    """RM score, log-probs under the policy and the reference, values, shaped rewards, then (unless
    advantages=False, as in evaluation) GAE ([实战框架 §4.2.3]), advantages whitened over the whole batch."""
    s, seq, pad, resp_mask = m.s, roll.seq, roll.pad, roll.resp_mask          # (B, P+R), (B,), (B, R)
    R = resp_mask.size(1)
    ended = (seq[:, -R:] == EOT).logical_and(resp_mask).any(1)               # (B,) emitted <|endoftext|>
    with m.autocast:
        logprobs = response_logprobs(m.policy, seq, pad, R, resp_mask=resp_mask)   # (B, R) log pi_old(a|s)
        ref_logprobs = response_logprobs(m.ref, seq, pad, R, resp_mask=resp_mask)  # (B, R) log pi_ref(a|s)
        values = response_values(m.critic, seq, pad, R).float()              # (B, R) V(s_t)
        reply_mask = torch.cat([torch.zeros_like(seq[:, :-R], dtype=torch.bool), resp_mask], 1)  # (B, P+R)
        rm_scores = m.rm.score(seq, reply_mask, pad).float()                  # (B,) normalised RM score
    replies = decode_replies(m.enc, seq, resp_mask)                          # B texts, for shape_rewards
    rewards, kl = shape_rewards(s, rm_scores, ended, logprobs, ref_logprobs, resp_mask, beta, replies)
    adv = returns = None                                                      # the evaluation needs none
    if advantages:
        adv, returns = m.gae(rewards, values, resp_mask, s.gamma, s.lam)      # (B, R) each
        if s.whiten_advantages:
            adv = whiten(adv, resp_mask, total=all_sum)                       # (B, R) over all processes
    return Experience(roll, logprobs, ref_logprobs, values, rm_scores, ended, rewards, kl, adv, returns, beta)


# ---- 3. update: PPO epochs over shuffled minibatches -------------------------------------------------------
def update(m, exp):
    """ppo_epochs passes over the rollout in shuffled minibatches: clipped surrogate + clipped value loss
    (ppo.ppo_loss), one Adam step each. Returns the mean of each loss statistic, and explained variance."""
    s, roll, w = m.s, exp.roll, m.world
    B = roll.resp_mask.size(0)                                             # this process's share of the batch
    rows = []                                                              # each minibatch's statistics
    for epoch in range(s.ppo_epochs):
        for mb in torch.randperm(B).split(s.minibatch_size // w.size):      # mb: (M,) episode indices
            with m.autocast:
                mb_logprobs, mb_entropy, mb_values = m.actor_critic(roll.seq[mb], roll.pad[mb],
                                                                    roll.resp_mask[mb])   # (M, R) each
            loss, stats = m.ppo_loss(mb_logprobs, exp.logprobs[mb], exp.advantages[mb], mb_values,
                                     exp.values[mb], exp.returns[mb], roll.resp_mask[mb], clip_eps=s.clip_eps,
                                     vf_clip=s.vf_clip, vf_coef=s.vf_coef, entropy=mb_entropy,
                                     ent_coef=s.ent_coef)
            if all_sum(torch.isfinite(loss).logical_not().float()) > 0:   # all stop, or none
                raise FloatingPointError(f"PPO loss is {loss.item()}: lower --lr or --critic_lr, or raise "
                                         "the KL coefficient")
            loss.backward()
            clip_and_step(m.optimizer, m.actor_critic.parameters(), s.grad_clip)
            rows.append([float(v) for v in stats.values()])
    means = [sum(col) / len(rows) for col in zip(*rows)]               # each statistic's mean in this process
    means = all_sum(torch.tensor(means, dtype=torch.float64, device=m.device))
    out = dict(zip(stats, (means / w.size).tolist()))                         # the mean over the processes
    out["explained_var"] = explained_variance(exp.values, exp.returns, roll.resp_mask, all_sum).item()
    return out


# ---- 4. log ------------------------------------------------------------------------------------------------
def log_row(it, exp, stats, panel, enc, times):
    """One row of the history: the means over the whole rollout batch (sums and counts added up over the
    torchrun processes), the update's statistics, the times."""
    mask = exp.roll.resp_mask
    golds = torch.tensor(panel.golds(decode_replies(enc, exp.roll.seq, mask)), device=mask.device)
    k3 = torch.where(mask, kl_k3(exp.logprobs, exp.ref_logprobs), 0.0)        # (B, R)
    per_reply = {"rm_score": exp.rm_scores, "reward": exp.rewards.sum(1), "gold": golds,
                 "kl": exp.kl.sum(1), "kl_k3": k3.sum(1), "reply_len": mask.sum(1), "ended": exp.ended}
    sums = all_sum(torch.stack([v.double().sum() for v in per_reply.values()]
                               + [torch.tensor(float(len(golds)), device=mask.device)]))   # sums, and count
    means = {k: (v / sums[-1]).item() for k, v in zip(per_reply, sums[:-1])}
    return {"iter": it, **means, "beta": exp.beta, **stats, "t_gen": times[0], "t_score": times[1],
            "t_update": times[2]}


def print_row(row, iters):
    t = row["t_gen"] + row["t_score"] + row["t_update"]
    print("iter {iter:3d}/{iters} | rm {rm_score:+.3f} | gold {gold:+.3f} | KL {kl:.2f} nats (k3 {kl_k3:.2f})"
          " | beta {beta:.3f} | len {reply_len:.1f} | ended {ended:.0%} | pg {pg_loss:+.3f} vf {vf_loss:.3f}"
          " | clip {clipfrac:.2f} | approx_kl {approx_kl:.3f} | H {entropy:.2f} | EV {explained_var:+.2f} | "
          "{t:.1f}s (gen {t_gen:.1f} / score {t_score:.1f} / update {t_update:.1f})"
          .format(**row, iters=iters, t=t), flush=True)


def save(s, m, kl_ctl, it, history, path):
    """Process 0 writes ppo.pt (the weights are the same on every process) and the plot."""
    bad = weights_problem(m.actor_critic)
    if bad:
        raise FloatingPointError(f"the policy's or the critic's weights are {bad} at iteration {it}: the run "
                                 f"diverged (lower --lr or --critic_lr). {last_good(path)}")
    if not m.world.main:
        return
    save_checkpoint({"model": m.policy.state_dict(), "model_args": asdict(m.policy.config),
                     "critic": m.critic.state_dict(), "optimizer": m.optimizer.state_dict(),
                     "kl_coef": kl_ctl.value, "iter": it, "history": history, "config": asdict(s),
                     "kind": "ppo", "rng": torch.get_rng_state(), **m.started_from}, path)
    plot(history, os.path.join(s.out_dir, "ppo_curves.png"))


# ---- evaluation: SFT and PPO replies to the same held-out prompts, judged by the same path -----------------
def rollouts(m, model, prompts, seed, batch=128):
    """`model`'s replies to many prompts, in batches, from a generator of their own (`seed`): Rollouts."""
    gen = torch.Generator(device=m.device).manual_seed(seed)
    return [rollout(m, model, prompts[i:i + batch], generator=gen) for i in range(0, len(prompts), batch)]


@torch.no_grad()
def judge(m, panel, model, prompts, seed):
    """`model`'s replies to the prompts, per reply: RM score, shaped reward at beta = 0, KL(policy || SFT)
    (k1, k3), gold score, text; the same path for both sides. Under torchrun all get every share."""
    w = m.world
    out = {k: [] for k in ("rm_score", "reward", "kl", "kl_k3", "text")}
    for roll in rollouts(m, model, w.shard(prompts), seed + w.rank):
        exp = score(m, roll, beta=0.0, advantages=False)     # no whitening: no collective inside a batch loop
        mask = roll.resp_mask
        out["rm_score"] += exp.rm_scores.tolist()
        out["reward"] += exp.rewards.sum(1).tolist()                          # beta = 0: the shaped score
        out["kl"] += exp.kl.sum(1).tolist()
        out["kl_k3"] += torch.where(mask, kl_k3(exp.logprobs, exp.ref_logprobs), 0.0).sum(1).tolist()
        out["text"] += decode_replies(m.enc, roll.seq, mask)
    out = {k: gather_shards(v) for k, v in out.items()}                      # back in the prompts' order
    out = {k: (v if k == "text" else np.array(v)) for k, v in out.items()}
    out["gold"] = panel.golds(out["text"])
    return out


def compare(ppo_side, sft_side, panel):
    """The held-out verdict: means of both sides, the PPO replies' KL, the gold win rate (ties half) and the
    vote (P[a random rater prefers the PPO reply])."""
    wins = np.where(np.abs(ppo_side["gold"] - sft_side["gold"]) < GOLD_EPS, 0.5,
                    (ppo_side["gold"] > sft_side["gold"]).astype(float))
    votes = [panel.vote(a, c) for a, c in zip(sft_side["text"], ppo_side["text"])]
    out = {"n": len(wins), "win_rate": float(np.mean(wins)), "vote_rate": float(np.mean(votes)),
           "kl": float(np.mean(ppo_side["kl"])), "kl_k3": float(np.mean(ppo_side["kl_k3"]))}
    for suffix, side in (("", ppo_side), ("_sft", sft_side)):
        out.update({f"{k}{suffix}": float(np.mean(side[k])) for k in ("rm_score", "reward", "gold")})
        out[f"reply_words{suffix}"] = float(np.mean([len(words(t)) for t in side["text"]]))
        out[f"real_word_rate{suffix}"] = real_word_rate(side["text"])
    return out


def final_report(s, m, panel, history, device, t_start, t_ppo):
    """SFT vs PPO on n_report held-out prompts: out/ppo_report.json and .md, printed; the plots."""
    prompts = unique_prompts(load_turns("test"), s.n_report, s.seed + 4)
    sft_side = judge(m, panel, m.ref, prompts, seed=s.seed + 5)
    ppo_side = judge(m, panel, m.policy, prompts, seed=s.seed + 6)
    rep = compare(ppo_side, sft_side, panel)
    rep.update(examples=list(zip(prompts, sft_side["text"], ppo_side["text"])),
               minutes_total=(time.time() - t_start) / 60, minutes_ppo=(time.time() - t_ppo) / 60,
               device=device, iters=s.iters, preset=s.preset, processes=m.world.size)
    if m.world.main:
        write_report(rep, os.path.join(s.out_dir, "ppo_report"))
    print("\nfinal report on {n} held-out prompts (plays never trained on), replies sampled at temperature 1:"
          "\n  reward-model score  SFT {rm_score_sft:+.3f} -> PPO {rm_score:+.3f}"
          "   (shaped reward, beta = 0: SFT {reward_sft:+.3f} -> PPO {reward:+.3f})"
          "\n  panel gold score    SFT {gold_sft:+.3f} -> PPO {gold:+.3f}"
          "\n  KL(PPO || SFT)      {kl:.2f} nats per reply (k3 estimate {kl_k3:.2f})"
          "\n  win rate vs SFT     {win_rate:.1%} (gold; ties count half)   panel vote {vote_rate:.1%}"
          "\n  reply length        SFT {reply_words_sft:.1f} -> PPO {reply_words:.1f} words;"
          " real-word rate SFT {real_word_rate_sft:.3f} -> PPO {real_word_rate:.3f}".format(**rep))
    for p, a, c in rep["examples"][:4]:
        print(f"\n  Human: {p}\n    SFT: {a}\n    PPO: {c}")
    runs = {f"{s.out_dir} ({beta_setting(asdict(s))})": history}
    for d in filter(None, s.compare_with.split(",")):
        ck = load_checkpoint(os.path.join(d, "ppo.pt"), made_by="train_ppo.py", kind="ppo")
        runs[f"{d} ({beta_setting(ck['config'])})"] = ck["history"]
    if m.world.main:
        plot_overoptimisation(runs, os.path.join(s.out_dir, "overoptimisation.png"))
    return rep


def write_report(rep, stem):
    write_text(stem + ".json", json.dumps(rep, indent=1))
    md = ("# PPO vs SFT on {n} held-out prompts ({device}, preset {preset}, {iters} iterations)\n\n"
          "| | SFT | PPO |\n|---|---|---|\n"
          "| reward-model score (normalised) | {rm_score_sft:+.3f} | {rm_score:+.3f} |\n"
          "| shaped reward, beta = 0 | {reward_sft:+.3f} | {reward:+.3f} |\n"
          "| panel gold score | {gold_sft:+.3f} | {gold:+.3f} |\n"
          "| reply length (words) | {reply_words_sft:.1f} | {reply_words:.1f} |\n"
          "| real-word rate | {real_word_rate_sft:.3f} | {real_word_rate:.3f} |\n\n"
          "KL(PPO || SFT) per reply: {kl:.2f} nats (k3 estimate {kl_k3:.2f}).  \n"
          "Win rate of PPO over SFT (panel gold, ties half): {win_rate:.1%}; panel vote: {vote_rate:.1%}.  \n"
          "Time: {minutes_total:.1f} min in all, PPO {minutes_ppo:.1f} min.\n\n## Examples\n").format(**rep)
    for p, a, c in rep["examples"][:12]:
        md += f"\n**Human:** {p}  \n**SFT:** {a}  \n**PPO:** {c}\n"
    write_text(stem + ".md", md)


def plot(history, path):
    tr = [h for h in history if "rm_score" in h]
    ev = [h for h in history if "eval_rm_score" in h]
    fig, axes = pyplot().subplots(2, 2, figsize=(10, 7))
    panels = [("rm_score", "reward-model score (normalised)"), ("gold", "panel gold score"),
              ("kl", "KL(policy || SFT), nats per reply"), ("vf_loss", "value loss")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([h["iter"] for h in tr], [h[key] for h in tr], label="training rollouts")
        if ev and "eval_" + key in ev[0]:
            ax.plot([h["iter"] for h in ev], [h["eval_" + key] for h in ev], "o-", label="held-out prompts")
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PPO: proxy (reward model) vs gold (panel); divergence = over-optimisation")
    save_figure(fig, path)


def beta_setting(config):
    """How a run set the KL coefficient, for a figure's legend: "beta = 0", "beta = 0.1", "adaptive beta"."""
    if config.get("adaptive_kl", True):
        return f"adaptive beta, KL target {config.get('kl_target', '?')}"
    return f"beta = {config.get('init_kl_coef', '?')}"


def plot_overoptimisation(runs, path):
    """Gao et al. (2022)'s picture: held-out RM score (proxy, solid) and gold (dashed) against sqrt(KL), a
    colour per run, SFT at KL = 0. Proxy up while gold goes down: the reward model is exploited."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, history), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ev = [h for h in history if "eval_rm_score" in h]
        if not ev:
            continue
        x = [0.0] + [max(h["eval_kl"], 0.0) ** 0.5 for h in ev]
        for key, style, what in (("rm_score", "o-", "reward model"), ("gold", "s--", "gold")):
            ax.plot(x, [ev[0][f"eval_{key}_sft"]] + [h[f"eval_{key}"] for h in ev], style, c=colour,
                    label=f"{name}: {what}")
    ax.set(xlabel="sqrt(KL(policy || SFT)), sqrt(nats per reply)", ylabel="held-out score",
           title="Over-optimisation: proxy vs gold against sqrt(KL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main)
