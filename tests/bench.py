"""
Benchmarks of the code the training scripts run, measured side by side in one run; prints a markdown table.

    python tests/bench.py                        # every row; small shapes on a CPU, full shapes on CUDA
    python tests/bench.py --rows sft,gae --repeats 10
    python tests/bench.py --device cuda --no-compile
    python tests/bench.py --help

Not a test (the file name does not start with test_, so pytest never collects it) and not run by CI.

Rows (full shape on CUDA / --small shape, the default on a CPU):
  1 sft      one SFT optimizer step as train_sft.py takes it (forward with targets + loss_mask, backward,
             clip, AdamW on model.param_groups): eager vs torch.compile'd, tokens/s and MFU; Hugging Face's
             GPT2LMHeadModel at the same shape as a peer when `transformers` is importable (never required).
  2 gen      sample.generate with the KV cache, batch 1 and 64, as train_ppo.rollout runs it (under bf16
             autocast on CUDA, the gpu preset's dtype): eager vs its forward compiled the way train_ppo.py
             compiles it (hidden_states, dynamic=True), HF generate with the same sampling; on a CPU also
             eager with one thread (decode-step ops are too small to share between threads).
  3 gae      a plain Python double loop vs ppo.gae (its backwards loop, the default) vs its matrix form vs
             ppo.fused(ppo.gae) (what train_ppo --compile runs: torch.compile of the matrix form).
  4 logprob  log-probs of sampled tokens, forward + backward: ppo.logprobs_plain (log_softmax(h @ W^T).gather,
             the default) vs ppo.logprobs_from_hidden (chunked); time and peak memory (CUDA: max_memory_allocated; CPU: the
             rise of VmHWM over VmRSS in a fresh subprocess, i.e. the real resident peak of the computation).
  5 ppo      one PPO iteration through train_ppo.rollout / score / update on a ctx built like train_ppo.main
             builds it, from randomly initialised models (no checkpoints needed).

Compiled variants run on every device (unless --no-compile); on a CPU they may be slower than eager, and
the table says so. Every time is the median of --repeats runs after warm-up; the variants of a row take
turns repeat by repeat (A B A B ...), so a neighbour's load on a shared machine hits them alike. CUDA
timings synchronize.

What it simplifies: random weights (speed does not depend on them; generation never stops early because a
random model almost never samples <|endoftext|>); one fixed batch per SFT step (no data-loading time);
dropout off everywhere.
"""
import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ppo  # noqa: E402
import train_ppo  # noqa: E402
import train_sft  # noqa: E402
from model import GPT, GPTConfig, param_groups  # noqa: E402
from data.prepare import EOT  # noqa: E402
from reward import RewardModel  # noqa: E402
from sample import generate  # noqa: E402

ROWS = ["sft", "gen", "gae", "logprob", "ppo"]

# Peak dense bf16 tensor-core throughput (no sparsity), from NVIDIA's data sheets. Other devices: unknown.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12)]


def peak_flops(device_name):
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------
# Shapes. Full: GPT-2 small and the gpu presets (for one H100). Small: the cpu presets, so the whole run
# takes a few minutes on 2 CPU cores.

def sft_preset_config(preset):
    """The GPTConfig and batch size train_sft.py uses for a preset (its Settings defaults + PRESETS)."""
    s = {f.name: f.default for f in fields(train_sft.Settings)} | train_sft.PRESETS[preset]
    cfg = GPTConfig(block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                    dropout=0.0)
    return cfg, s["batch_size"]


def shapes(small):
    gpt2 = GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)   # GPT-2 small
    if not small:
        return dict(sft_cfg=gpt2, sft_batch=12,
                    gen_cfg=gpt2, gen_batches=(1, 64), gen_prompt=128, gen_new=128,
                    gae_B=512, gae_T=1024,
                    lp_B=64, lp_T=512, lp_d=768, lp_V=50257, lp_chunks=(1024,),
                    ppo_cfg=sft_preset_config("gpu")[0], ppo_settings=dict(train_ppo.PRESETS["gpu"], preset="gpu"))
    # Small: the cpu preset model (4 layers, d=128, T=256). Batch sizes, token counts and PPO epochs are cut
    # (halved: SFT batch 8 -> 4, 32 -> 16 new tokens; 4 PPO epochs -> 1) so that the whole run takes a few
    # minutes on 2 CPU cores; the shape column says what ran. The log-prob row keeps N = B*T = 2,048 rows, two
    # chunks of the default 1,024, so that the chunking shows.
    cpu_cfg, cpu_batch = sft_preset_config("cpu")
    return dict(sft_cfg=cpu_cfg, sft_batch=cpu_batch // 2,
                gen_cfg=cpu_cfg, gen_batches=(1, 64), gen_prompt=32, gen_new=16,
                gae_B=64, gae_T=128,
                lp_B=8, lp_T=256, lp_d=cpu_cfg.n_embd, lp_V=cpu_cfg.vocab_size, lp_chunks=(1024, 256),
                ppo_cfg=cpu_cfg,
                ppo_settings=dict(train_ppo.PRESETS["cpu"], preset="cpu", batch_size=16, max_new_tokens=24,
                                  ppo_epochs=1))


# ----------------------------------------------------------------------------------------------------
# Timing

class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.results = []                      # table rows
        self.notes = []                        # lines printed under the table

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def side_by_side(self, variants, warmup=None):
        """variants: {name: fn}. Warm each up (the first call's time is kept: for compiled code it is the
        compile), then time them in turns for --repeats rounds. Returns {name: dict(first, median, times,
        out, error)}; a variant that raises is reported as failed and dropped, the others go on."""
        warmup = self.args.warmup if warmup is None else warmup
        res = {}
        for name, fn in variants.items():
            try:
                before, breaks = dynamo_counts(), graph_breaks()
                first, out = self.timed(fn)
                graphs, breaks = dynamo_counts() - before, graph_breaks() - breaks
                for _ in range(warmup - 1):
                    self.timed(fn)
                res[name] = dict(first=first, times=[], outs=[], out=out, graphs_first=graphs, breaks_first=breaks)
            except Exception as e:  # noqa: BLE001 (an untested path on some device must not end the run)
                res[name] = dict(error=self.failed(e))
        live = [n for n in variants if "error" not in res[n]]
        for _ in range(self.args.repeats):
            for name in live:
                if "error" in res[name]:
                    continue
                try:
                    before = dynamo_counts()
                    t, out = self.timed(variants[name])
                    res[name]["times"].append(t)
                    res[name]["outs"].append(out)
                    res[name]["out"] = out
                    res[name]["graphs_timed"] = res[name].get("graphs_timed", 0) + (dynamo_counts() - before)
                except Exception as e:  # noqa: BLE001
                    res[name] = dict(error=self.failed(e))
        for r in res.values():
            if "error" not in r:
                r["median"] = statistics.median(r["times"])
        return res

    def failed(self, e):
        """One line for the table; frees what a failed (e.g. out-of-memory) variant left in the CUDA cache."""
        if self.cuda:
            torch.cuda.empty_cache()
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}".replace("|", "/")

    def add(self, row, variant, shape, time_s=None, thr="", ratio="", error=None):
        if error is not None:
            self.results.append((row, variant, shape, "—", f"failed: {error}", ""))
        else:
            self.results.append((row, variant, shape, fmt_time(time_s) if time_s is not None else "—", thr, ratio))


def dynamo_counts():
    """Graphs compiled so far by torch.compile in this process (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def graph_breaks():
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def fmt_time(t):
    if t < 1e-3:
        return f"{t * 1e6:,.0f} µs"
    if t < 1:
        return f"{t * 1e3:,.1f} ms"
    return f"{t:,.2f} s"


def fmt_bytes(n):
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def speedup(base, t):
    return "1.00 (baseline)" if base == t else f"×{base / t:.2f} speed"


def compile_note(name, r):
    return (f"{name}: first call {fmt_time(r['first'])} (includes compiling), {r['graphs_first']} graph(s) "
            f"compiled and {r['breaks_first']} graph break(s) then, {r.get('graphs_timed', 0)} graph(s) more "
            "during the timed repeats")


# ----------------------------------------------------------------------------------------------------
# Row 1: SFT training step (the inner loop of train_sft.main: forward with targets + loss_mask under
# autocast, backward, clip the gradient norm, AdamW step on param_groups, zero_grad).

def sft_step(train_model, model, optimizer, x, y, m, autocast, hf=False):
    with autocast:
        loss = train_model(input_ids=x, labels=x).loss if hf else train_model(x, y, m)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()                         # train_sft reads the loss every step too


def sft_flops(cfg, n_body, B, n_lm_head):
    """Training FLOPs of one step (forward + backward = 3 x forward; PaLM appendix B):
        6 * N_body * B*T               every weight matrix in the blocks, 2 FLOPs per multiply-add, x3
      + 6 * d * V * n_lm_head          the (tied) lm_head matmul, only on the positions that get a loss
      + 12 * L * d * T * B*T           attention scores and weighted values (QK^T and AV), x3
    N_body = the parameters of the transformer blocks (weights and biases; embeddings excluded: a lookup is
    no FLOPs, sinusoidal positions are no parameters). Causal masking is not discounted (as in PaLM/nanoGPT)."""
    L, d, T, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size
    return 6 * n_body * B * T + 6 * d * V * n_lm_head + 12 * L * d * T * B * T


def sft_batch(cfg, B, device):
    """B real training windows of T tokens (data/cache/train.bin) and their reply masks, as get_batch cuts them."""
    from data.prepare import CACHE_DIR, prepare
    prepare(verbose=False)
    tokens = np.memmap(os.path.join(CACHE_DIR, "train.bin"), dtype=np.uint16, mode="r")
    mask = np.memmap(os.path.join(CACHE_DIR, "train_mask.bin"), dtype=np.uint8, mode="r")
    T = cfg.block_size
    starts = torch.randint(len(tokens) - T - 1, (B,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in starts])           # (B, T)
    y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in starts])   # (B, T)
    m = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + T].astype(np.bool_)) for i in starts])     # (B, T)
    return x.to(device), y.to(device), m.to(device)


def row_sft(bench, sh, compile_on):
    dev, cfg, B = bench.device, sh["sft_cfg"], sh["sft_batch"]
    T = cfg.block_size
    shape = f"L={cfg.n_layer} d={cfg.n_embd} h={cfg.n_head} T={T} V={cfg.vocab_size} B={B}"
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    model.train()
    n_body = sum(p.numel() for p in model.blocks.parameters())               # weights + biases of the blocks
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=bench.cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bench.cuda else nullcontext()
    x, y, reply_mask = sft_batch(cfg, B, dev)
    all_mask = torch.ones_like(reply_mask)
    n_reply = int(reply_mask.sum())
    variants = {
        "ours eager": lambda: sft_step(model, model, optimizer, x, y, all_mask, autocast),
        "ours eager, loss on reply tokens only (train_sft default)":
            lambda: sft_step(model, model, optimizer, x, y, reply_mask, autocast),
    }
    if compile_on:
        compiled = torch.compile(model)                                       # what train_sft --compile does
        variants["ours torch.compile(model)"] = lambda: sft_step(compiled, model, optimizer, x, y, all_mask, autocast)
    hf_model = None
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=T, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf_model = GPT2LMHeadModel(hf_cfg).to(dev).train()
        hf_opt = torch.optim.AdamW(param_groups(hf_model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=bench.cuda)
        variants["HF GPT2LMHeadModel eager"] = lambda: sft_step(hf_model, hf_model, hf_opt, x, None, None, autocast, hf=True)
        if compile_on:
            hf_compiled = torch.compile(hf_model)
            variants["HF GPT2LMHeadModel torch.compile"] = \
                lambda: sft_step(hf_compiled, hf_model, hf_opt, x, None, None, autocast, hf=True)
    except ImportError:
        pass
    res = bench.side_by_side(variants)
    peak = peak_flops(bench.device_name)
    base = res["ours eager"].get("median")
    for name, r in res.items():
        if "error" in r:
            bench.add("1 sft", name, shape, error=r["error"])
            continue
        n_lm = n_reply if "reply" in name else B * T
        flops = sft_flops(cfg, n_body, B, n_lm)
        achieved = flops / r["median"]
        mfu = f"MFU {achieved / peak:.1%}" if peak else "MFU n/a (peak unknown)"
        thr = f"{B * T / r['median']:,.0f} tok/s, {achieved / 1e12:.3f} TFLOP/s, {mfu}"
        bench.add("1 sft", name, shape, r["median"], thr, speedup(base, r["median"]) if base else "")
        if "compile" in name:
            bench.notes.append("sft " + compile_note(name, r))
    if hf_model is None:
        bench.add("1 sft", "HF GPT2LMHeadModel", shape, None, "not installed (pip install transformers to compare)")
    if compile_on and "error" not in res.get("ours torch.compile(model)", {"error": 1}):
        bench.notes.append("sft: our graph breaks come from GPT.forward's h[loss_mask] (a boolean-mask select has "
                           "a data-dependent shape), so the forward is two compiled graphs plus an eager select")
    flops = sft_flops(cfg, n_body, B, B * T)
    bench.notes.append(f"sft FLOPs/step = 6*N_body*B*T + 6*d*V*n_loss + 12*L*d*T*B*T with N_body = {n_body:,} "
                       f"(block weights+biases), d*V = {cfg.n_embd * cfg.vocab_size:,} (tied lm_head matmul), "
                       f"n_loss = positions given a loss (all {B * T}, or {n_reply} reply tokens): "
                       f"{flops / (B * T) / 1e6:.1f} MFLOP/token with all positions")


# ----------------------------------------------------------------------------------------------------
# Row 2: generation with the KV cache (sample.generate, pure sampling at temperature 1, as train_ppo.rollout
# calls it: under bf16 autocast on CUDA, the gpu preset's dtype; float32 on a CPU, the cpu preset's).

def row_gen(bench, sh, compile_on):
    dev, cfg = bench.device, sh["gen_cfg"]
    P, R = sh["gen_prompt"], sh["gen_new"]
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    comp_model = None
    if compile_on:
        comp_model = copy.deepcopy(model)
        comp_model.hidden_states = torch.compile(comp_model.hidden_states, dynamic=True)  # as train_ppo.main
    hf_model = None
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
                                              n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dev).eval()
    except ImportError:
        pass
    gen = torch.Generator(device=dev).manual_seed(0)

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bench.cuda)

    def ours(m, prompts):
        with autocast:
            seq, pad, resp_mask = generate(m, prompts, R, temperature=1.0, generator=gen)
        return resp_mask.numel()                                              # B * R generated tokens

    @torch.no_grad()
    def hf(ids):
        with autocast:
            out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=R, min_new_tokens=R,
                                    pad_token_id=EOT)
        return ids.size(0) * (out.size(1) - ids.size(1))

    for B in sh["gen_batches"]:
        shape = f"L={cfg.n_layer} d={cfg.n_embd} V={cfg.vocab_size} B={B} prompt {P} + {R} new"
        prompts = torch.randint(0, EOT, (B, P), generator=torch.Generator().manual_seed(B)).tolist()
        variants = {"ours eager": lambda: ours(model, prompts)}
        if not bench.cuda and torch.get_num_threads() > 1:
            variants["ours eager, torch.set_num_threads(1)"] = lambda: one_thread(lambda: ours(model, prompts))
        if comp_model is not None:
            variants["ours compiled hidden_states (dynamic=True)"] = lambda: ours(comp_model, prompts)
        if hf_model is not None:
            ids = torch.tensor(prompts, device=dev)
            variants["HF generate (same sampling)"] = lambda: hf(ids)
        res = bench.side_by_side(variants)
        base = res["ours eager"].get("median")
        for name, r in res.items():
            if "error" in r:
                bench.add("2 gen", name, shape, error=r["error"])
                continue
            bench.add("2 gen", name, shape, r["median"], f"{r['out'] / r['median']:,.0f} new tok/s",
                      speedup(base, r["median"]) if base else "")
            if "compiled" in name:
                bench.notes.append(f"gen B={B} " + compile_note(name, r))
        if hf_model is None:
            bench.add("2 gen", "HF generate", shape, None, "not installed")


def one_thread(fn):
    """Run fn with one intra-op thread: tiny decode-step ops then never wait for a second thread to wake."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------
# Row 3: GAE

def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook double loop over rows and (backwards) time, on Python floats. Returns lists."""
    rewards, values = rewards.tolist(), values.tolist()
    adv_all, ret_all = [], []
    for b in range(len(rewards)):
        T_b, r, v = lengths[b], rewards[b], values[b]
        adv, last = [0.0] * len(r), 0.0
        for t in reversed(range(T_b)):
            next_v = v[t + 1] if t + 1 < T_b else 0.0                        # V = 0 after the reply ends
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        adv_all.append(adv)
        ret_all.append([a + v[t] if t < T_b else 0.0 for t, a in enumerate(adv)])
    return adv_all, ret_all


def row_gae(bench, sh, compile_on):
    dev, B, T = bench.device, sh["gae_B"], sh["gae_T"]
    shape = f"B={B} T={T} float32"
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=g).to(dev)
    values = torch.randn(B, T, generator=g).to(dev)
    lengths = torch.randint(1, T + 1, (B,), generator=g)                      # ragged replies
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)              # (B, T) prefix
    lengths = lengths.tolist()
    gamma, lam = 1.0, 0.95
    variants = {"naive Python double loop": lambda: gae_loop(rewards, values, lengths, gamma, lam),
                "ppo.gae, backwards loop (the default)": lambda: ppo.gae(rewards, values, mask, gamma, lam),
                "ppo.gae(matrix=True), eager": lambda: ppo.gae(rewards, values, mask, gamma, lam, matrix=True)}
    if compile_on:
        gae_c = ppo.fused(ppo.gae)                                            # what train_ppo --compile runs
        variants["ppo.fused(ppo.gae) compiled (matrix form)"] = lambda: gae_c(rewards, values, mask, gamma, lam)
    res = bench.side_by_side(variants)
    adv_ref = torch.tensor(res["naive Python double loop"]["out"][0], device=dev)
    base = res["naive Python double loop"]["median"]
    for name, r in res.items():
        if "error" in r:
            bench.add("3 gae", name, shape, error=r["error"])
            continue
        bench.add("3 gae", name, shape, r["median"], f"{r['median'] * 1e6:,.0f} µs/call", speedup(base, r["median"]))
        if name != "naive Python double loop":
            err = (r["out"][0] - adv_ref).abs().max().item()
            bench.notes.append(f"gae: {name} max |advantage - loop| = {err:.1e}")
        if "compiled" in name:
            bench.notes.append("gae " + compile_note(name, r))


# ----------------------------------------------------------------------------------------------------
# Row 4: log-probs of the sampled tokens, forward + backward

def logprob_inputs(B, T, V, d, device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=g).to(device).requires_grad_()         # (B, T, d) hidden states
    W = (0.02 * torch.randn(V, d, generator=g)).to(device).requires_grad_()   # (V, d) tied lm_head
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)              # (B, T) sampled tokens
    grad = torch.randn(B, T, generator=g).to(device)                          # (B, T) dL/dlogp
    return h, W, tokens, grad


def logprob_fn(variant, h, W, tokens, grad):
    def run():
        h.grad = W.grad = None
        if variant == "naive":
            logp = ppo.logprobs_plain(h, W, tokens)
        else:
            logp = ppo.logprobs_from_hidden(h, W, tokens, chunk_size=int(variant))
        (logp * grad).sum().backward()
        return logp.detach()
    return run


def rss_peak_child(spec):
    """Run in a fresh process: the rise of the resident-set high-water mark (VmHWM) over the resident set
    before the computation (VmRSS), in bytes. PyTorch's CPU allocator has no cache and (with the fixed
    MALLOC_MMAP_THRESHOLD_ the parent sets) large blocks are mmap'ed, so a freed tensor leaves the resident
    set at once: the rise is the peak of live tensors of the computation (to the page)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    torch.set_num_threads(spec["threads"])
    h, W, tokens, grad = logprob_inputs(spec["B"], spec["T"], spec["V"], spec["d"], "cpu")
    run = logprob_fn(spec["variant"], h, W, tokens, grad)
    rss0 = status("VmRSS")
    run()
    return status("VmHWM") - rss0


def row_logprob(bench, sh, compile_on):
    dev, B, T, d, V = bench.device, sh["lp_B"], sh["lp_T"], sh["lp_d"], sh["lp_V"]
    shape = f"B={B} T={T} V={V} d={d} float32, fwd+bwd"
    h, W, tokens, grad = logprob_inputs(B, T, V, d, dev)
    names = {"naive": "ppo.logprobs_plain, log_softmax(h @ W^T).gather (the default up to 1 GiB of logits)"}
    for c in sh["lp_chunks"]:
        names[str(c)] = f"ppo.logprobs_from_hidden, chunk_size={c}" + (" (above 1 GiB)" if c == 1024 else "")
    variants = {names[k]: logprob_fn(k, h, W, tokens, grad) for k in names}
    res = bench.side_by_side(variants)
    peaks = {}
    for k, name in names.items():
        if "error" in res[name]:
            continue
        if bench.cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                variants[name]()
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() - base
            except Exception as e:  # noqa: BLE001
                bench.notes.append(f"logprob: memory of {name} not measured: {bench.failed(e)}")
        else:
            spec = dict(variant=k, B=B, T=T, V=V, d=d, threads=torch.get_num_threads())
            # A fixed glibc mmap threshold: every block >= 1 MiB is mmap'ed and returned to the OS when freed.
            # (By default glibc raises the threshold after the first large free, later blocks of that size
            # come from the heap and freed ones stay resident: the high-water mark would count dead tensors.)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", json.dumps(spec)],
                                 capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode == 0:
                peaks[name] = int(out.stdout.strip().splitlines()[-1])
            else:
                bench.notes.append(f"logprob: memory child failed: {out.stderr.strip()[-300:]}")
    base_t = res[names["naive"]].get("median")
    base_m = peaks.get(names["naive"])
    ref = res[names["naive"]].get("out")
    for name, r in res.items():
        if "error" in r:
            bench.add("4 logprob", name, shape, error=r["error"])
            continue
        mem = peaks.get(name)
        thr = f"peak {fmt_bytes(mem)}" if mem is not None else "peak ?"
        ratio = speedup(base_t, r["median"]) if base_t else ""
        if mem is not None and base_m:
            ratio += f", memory ×{mem / base_m:.2f}"
        bench.add("4 logprob", name, shape, r["median"], thr, ratio)
        if ref is not None and name != names["naive"]:
            bench.notes.append(f"logprob: {name} max |logp - naive| = {(r['out'] - ref).abs().max().item():.1e}")
    how = "torch.cuda.max_memory_allocated() above the inputs" if bench.cuda else \
        "VmHWM - VmRSS of a fresh subprocess running one forward+backward (inputs excluded)"
    sizes = ", ".join(f"(chunk={c}, V) {fmt_bytes(min(c, B * T) * V * 4)}" for c in sh["lp_chunks"])
    bench.notes.append(f"logprob: peak memory = {how}; one float32 (B*T, V) tensor is {fmt_bytes(B * T * V * 4)}, "
                       f"{sizes}; (V, d) weight gradient {fmt_bytes(V * d * 4)}")


# ----------------------------------------------------------------------------------------------------
# Row 5: one PPO iteration through train_ppo's own rollout / score / update.

def build_ppo_models(s, cfg, device):
    """The Models train_ppo.main builds (train_ppo.build_models), from randomly initialised models instead of
    checkpoints."""
    torch.manual_seed(s.seed)
    policy = GPT(cfg).to(device)
    rm = RewardModel(cfg).to(device)
    return train_ppo.build_models(s, device, policy, copy.deepcopy(policy), rm, copy.deepcopy(rm))


def ppo_iteration(m, batches, counter):
    prompts = batches[counter[0] % len(batches)]
    counter[0] += 1
    t = [time.perf_counter()]
    sync = torch.cuda.synchronize if m.device == "cuda" else (lambda: None)
    roll = train_ppo.rollout(m, m.policy, prompts)
    sync(); t.append(time.perf_counter())
    exp = train_ppo.score(m, roll, 0.05)
    sync(); t.append(time.perf_counter())
    train_ppo.update(m, exp)
    sync(); t.append(time.perf_counter())
    return dict(gen=t[1] - t[0], score=t[2] - t[1], update=t[3] - t[2], R=roll.resp_mask.size(1),
                P=roll.seq.size(1) - roll.resp_mask.size(1))


def row_ppo(bench, sh, compile_on):
    dev = bench.device.type
    base_s = dict(sh["ppo_settings"], device=dev, dtype="bfloat16" if bench.cuda else "float32")
    cfg = sh["ppo_cfg"]
    from data.prepare import load_turns, unique_prompts
    prompts = unique_prompts(load_turns("train"), None, 1337)
    s0 = train_ppo.Settings(**base_s, compile=False)
    batches = [[prompts[(i * s0.batch_size + j) % len(prompts)] for j in range(s0.batch_size)] for i in range(8)]
    shape = (f"L={cfg.n_layer} d={cfg.n_embd} T<={cfg.block_size}, batch {s0.batch_size}, max_new_tokens "
             f"{s0.max_new_tokens}, {s0.ppo_epochs} epoch(s) x {-(-s0.batch_size // s0.minibatch_size)} minibatches "
             f"of {s0.minibatch_size}, {s0.dtype if not bench.cuda else 'bf16 autocast'}"
             f"{'' if s0.ppo_epochs == train_ppo.Settings.ppo_epochs else f' (preset: {train_ppo.Settings.ppo_epochs} epochs)'}")
    ctxs = {"eager": build_ppo_models(s0, cfg, dev)}
    if compile_on:
        ctxs["compiled (s.compile: hidden_states, gae, ppo_loss)"] = \
            build_ppo_models(train_ppo.Settings(**base_s, compile=True), cfg, dev)
    counters = {name: [0] for name in ctxs}
    res = bench.side_by_side({name: (lambda n=name: ppo_iteration(ctxs[n], batches, counters[n])) for name in ctxs},
                             warmup=max(1, bench.args.warmup))
    base = res["eager"].get("median")
    for name, r in res.items():
        if "error" in r:
            bench.add("5 ppo", name, shape, error=r["error"])
            continue
        # split: the median of each phase over the repeats (they need not add up to the median total exactly)
        parts = {k: statistics.median(x[k] for x in r["outs"]) for k in ("gen", "score", "update")}
        thr = (f"gen {fmt_time(parts['gen'])} / score {fmt_time(parts['score'])} / update "
               f"{fmt_time(parts['update'])}; {s0.batch_size / r['median']:,.1f} episodes/s")
        bench.add("5 ppo", name, shape, r["median"], thr, speedup(base, r["median"]) if base else "")
        if "compiled" in name:
            bench.notes.append("ppo " + compile_note(name, r) + ". To see why each recompile happens: "
                               "TORCH_LOGS=recompiles python tests/bench.py --rows ppo")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto = cuda if available)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of rows by name or number: {','.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per variant; the median is reported (default: 3 CPU, 5 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing (default: 1 CPU, 3 CUDA)")
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                   help="small shapes (default: on for CPU, off for CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile variant")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)                     # internal: memory subprocess
    args = p.parse_args(argv)
    if args.rss_child:
        print(rss_peak_child(json.loads(args.rss_child)))
        return
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if args.small is None:
        args.small = not cuda
    if args.repeats is None:
        args.repeats = 5 if cuda else 3
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    wanted = []
    for r in args.rows.split(","):
        r = r.strip()
        name = ROWS[int(r) - 1] if r.isdigit() and 1 <= int(r) <= len(ROWS) else r
        if name not in ROWS:
            p.error(f"unknown row {r!r}; choose from {', '.join(ROWS)} or 1-{len(ROWS)}")
        wanted.append(name)
    bench = Bench(args, device)
    bench.device_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    sh = shapes(args.small)
    comp = not args.no_compile
    rows = {"sft": (row_sft, comp), "gen": (row_gen, comp), "gae": (row_gae, comp), "logprob": (row_logprob, False),
            "ppo": (row_ppo, comp)}
    t0, load0 = time.time(), " ".join(f"{x:.1f}" for x in os.getloadavg())  # others' jobs on a shared machine
    for name in wanted:
        fn, comp = rows[name]
        t_row = time.time()
        print(f"[bench] row {name} ...", file=sys.stderr, flush=True)
        fn(bench, sh, comp)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()                         # the next row gets the memory this one freed
        print(f"[bench] row {name} done in {time.time() - t_row:.0f} s", file=sys.stderr, flush=True)

    print("| row | variant | shape | time | throughput / memory | ratio vs baseline |")
    print("|---|---|---|---|---|---|")
    for r in bench.results:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"device: {bench.device_name} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"dtype: {'bf16 autocast (sft, gen, ppo), float32 (gae, logprob)' if cuda else 'float32'} | "
          f"shapes: {'small (CPU)' if args.small else 'full'} | median of {args.repeats} after {args.warmup} warm-up | "
          f"total {time.time() - t0:.0f} s | load average at start {load0}")
    for n in bench.notes:
        print(f"- {n}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{os.cpu_count()}-core {model} (CPU)"


if __name__ == "__main__":
    main()
