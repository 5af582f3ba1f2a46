"""
The GPT of the book ([实战框架 §4.1] transformer 架构), plus the few things every script needs with it.

    from model import GPT, GPTConfig, get_tokenizer
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128))
    logits = model(idx)                    # (B, T, vocab_size)
    loss = model(idx, targets, loss_mask)  # scalar, mean over masked target tokens
    h = model.hidden_states(idx)           # (B, T, n_embd): reward model and critic put scalar heads here

What is here, top to bottom:
  [实战框架 §4.1.2] position encoding      sinusoidal_positions()
  [实战框架 §4.1.3] layer normalization    LayerNorm, written out
  [实战框架 §4.1.1] self-attention 机制     CausalSelfAttention (readable math path + fused SDPA path)
         KV cache for incremental decoding KVCache
         the transformer                   Block, GPT
  and what every script needs beside the model:
         learning rate, weight-decay groups, one optimizer step   lr_at, param_groups, clip_and_step
         tokenizer (GPT-2's BPE cut to 8,192 ids, offline)        get_tokenizer
         chat format (HH-RLHF transcripts)                        format_prompt, encode_reply
         settings dataclass -> --flags, checked before any work   parse_settings, nested_settings, start_run
         one run per out_dir (a lock naming its holder)           lock_out_dir, unlock_out_dir
         torchrun: this process's rank, collectives               World, start_world, all_sum, gather_shards
         one line for an expected error, Ctrl-C, out of memory    run_script, out_of_memory
         files written atomically, each writer its own temp file  atomic_write, write_text, file_sha256
         checkpoints: one schema per kind, checked on every load  save_checkpoint, load_checkpoint,
                                                         LOAD_FIELDS, RESUME_FIELDS, checkpoint_problem
         figures (matplotlib, headless)                           pyplot, save_figure

What it simplifies: no rotary or learned positions, no grouped-query attention, no mixture of experts;
one attention implementation switch (`use_sdpa`) instead of a zoo of kernels.

Left padding. Batched generation puts prompts of different lengths in one tensor by padding them on the
left; `pad` (B,) says how many pad tokens each row starts with. Pad tokens are never attended to and
positions count from each row's first real token, so a padded row computes exactly what it would alone.
"""
import contextlib
import math
import os
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import fcntl                        # file locks (POSIX); none on Windows
except ImportError:
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class GPTConfig:
    vocab_size: int = 8192   # VOCAB_SIZE: GPT-2's BPE cut to 8,191 tokens + <|endoftext|> (see get_tokenizer)
    block_size: int = 256     # longest sequence (context window) the model is trained on
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # model width d_model
    dropout: float = 0.0      # dropout on embeddings, attention weights and residual branches
    bias: bool = True         # biases in Linear layers and LayerNorm beta


# ----------------------------------------------------------------------------------------------------
# [实战框架 §4.1.2] position encoding: the sinusoidal positional encoding
#   PE(pos, 2i)   = sin(pos / 10000^(2i/d_model))
#   PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))
# Nothing is learned; any position up to max_len can be encoded.

def sinusoidal_positions(max_len, d_model):
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)             # (max_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)                  # (d_model/2,)
    angle = pos / (10000.0 ** (two_i / d_model))                              # (max_len, d_model/2)
    pe = torch.zeros(max_len, d_model)                                        # (max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe


# ----------------------------------------------------------------------------------------------------
# [实战框架 §4.1.3] layer normalization: y = gamma * (x - mean) / sqrt(var + eps) + beta, over the last dim.
# Written out so a student sees every step; a test checks it equals F.layer_norm.

class LayerNorm(nn.Module):
    def __init__(self, d, bias=True, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))                             # gamma
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None            # beta

    def forward(self, x):                                                     # x: (..., d)
        mean = x.mean(dim=-1, keepdim=True)                                   # (..., 1)
        var = x.var(dim=-1, keepdim=True, unbiased=False)                   # (..., 1) biased, as in the paper
        x_hat = (x - mean) / torch.sqrt(var + self.eps)                       # (..., d)
        y = self.weight * x_hat                                               # (..., d)
        return y + self.bias if self.bias is not None else y


# ----------------------------------------------------------------------------------------------------
# KV cache: keys and values of every position seen so far, so decoding token t costs O(t), not O(t^2).

class KVCache:
    def __init__(self, n_layer, batch_size, n_head, max_len, head_size, device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)               # (L, B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)               # (L, B, nh, max_len, hs)
        self.pos = 0                                                          # positions filled so far

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) for `layer`; return all keys/values so far."""
        T = k.size(2)
        if self.pos + T > self.k.size(3):
            raise ValueError(f"KV cache is full: {self.pos} + {T} > {self.k.size(3)} positions")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, nh, pos+T, hs)


def attention_mask(T_q, offset, pad, device):
    """Boolean mask (B or 1, 1, T_q, offset+T_q): True where query i may attend to key j.

    Causal (j <= i) and, with left padding, never to a pad key. Each position may always attend to
    itself, so a pad query (whose output is ignored) still has one key and the softmax has no NaN."""
    q_pos = offset + torch.arange(T_q, device=device)                         # (T_q,)
    k_pos = torch.arange(offset + T_q, device=device)                         # (T_k,)
    mask = k_pos[None, :] <= q_pos[:, None]                                   # (T_q, T_k) causal
    if pad is not None:
        real = k_pos[None, None, :] >= pad[:, None, None]                     # (B, 1, T_k) key is not padding
        mask = (mask[None] & real) | (k_pos[None, :] == q_pos[:, None])[None]  # (B, T_q, T_k)
    else:
        mask = mask[None]                                                     # (1, T_q, T_k)
    return mask.unsqueeze(1)                                                  # (B|1, 1, T_q, T_k)


# ----------------------------------------------------------------------------------------------------
# [实战框架 §4.1.1] self-attention 机制: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + causal mask) V
# (the causal mask, which lets a position see only itself and the past, is not in the book's formula)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.layer = cfg.n_head, layer
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)      # W_Q, W_K, W_V in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)         # W_O
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.use_sdpa = True   # False: the explicit math path below (same result, slower; edit it freely)

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.shape                                                     # (B, T, d)
        hs = C // self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)                                 # 3 x (B, T, d)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)                     # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)                     # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)                     # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                             # (B, nh, T_k, hs), T_k >= T
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:  # fused kernel (flash / memory-efficient attention on GPU)
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        else:  # the formula, step by step
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)                   # (B, nh, T, T_k)
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
            att = att.masked_fill(~mask, float("-inf"))                       # (B, nh, T, T_k)
            att = F.softmax(att, dim=-1)                                      # (B, nh, T, T_k)
            att = F.dropout(att, p=p, training=self.training)
            y = att @ v                                                       # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                      # (B, T, d) heads side by side
        return self.resid_drop(self.proj(y))                                  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):                                                     # (B, T, d)
        return self.drop(self.proj(F.gelu(self.fc(x))))                      # (B, T, d) via (B, T, 4d)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None):                              # (B, T, d)
        x = x + self.attn(self.ln_1(x), mask, cache)                          # (B, T, d)
        return x + self.mlp(self.ln_2(x))                                     # (B, T, d)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)                   # token embedding
        self.register_buffer("pe", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                                 # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():                               # GPT-2: scale residual outputs
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def set_sdpa(self, on):
        """Switch every attention layer between the fused SDPA kernel and the explicit math path."""
        for block in self.blocks:
            block.attn.use_sdpa = on

    def new_cache(self, batch_size, max_len=None):
        """An empty KV cache. Under autocast the keys and values come out of the attention projection in the
        autocast dtype (bf16): stored as such, decoding reads half the bytes of a float32 cache, for free."""
        c, device = self.config, self.wte.weight.device
        autocast_on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast_on else self.wte.weight.dtype
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       device=device, dtype=dtype)

    def hidden_states(self, idx, pad=None, cache=None):
        """Final hidden states after ln_f, (B, T, d). `pad` (B,): left-pad count per row. With `cache`,
        idx holds only the new tokens; their keys/values are appended to the cache."""
        B, T = idx.shape
        offset = cache.pos if cache is not None else 0
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.config.block_size}")
        pos = offset + torch.arange(T, device=idx.device)                     # (T,)
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)              # (B, T) count from first real token
        mask = None                                                           # None means plain causal
        if pad is not None or offset > 0:
            mask = attention_mask(T, offset, pad, idx.device)                 # (B|1, 1, T, offset+T)
        x = self.wte(idx) * math.sqrt(self.config.n_embd) + self.pe[pos]   # (B, T, d) x sqrt(d): Vaswani 2017
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask, cache)                                         # (B, T, d)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)                                                   # (B, T, d)

    def forward(self, idx, targets=None, loss_mask=None, pad=None, cache=None):
        """Without targets: logits (B, T, vocab). With targets (B, T): mean cross-entropy over the
        positions where loss_mask (B, T) is True (all positions if it is None). Only those positions go
        through the vocabulary projection, which is most of the cost on a CPU."""
        h = self.hidden_states(idx, pad, cache)                               # (B, T, d)
        if targets is None:
            return self.lm_head(h)                                            # (B, T, V)
        if loss_mask is None:
            loss_mask = torch.ones_like(targets, dtype=torch.bool)
        loss_mask = loss_mask.bool()  # a 0/1 integer mask (the uint8 *_mask.bin data) would index, not select
        h_sel = h[loss_mask]                                                  # (N, d) N = trained tokens
        logits = self.lm_head(h_sel)                                          # (N, V)
        return F.cross_entropy(logits.float(), targets[loss_mask])            # scalar


def lr_at(step, lr, min_lr, warmup_iters, max_iters):
    """The learning rate of every trainer: linear warmup to lr over warmup_iters steps, then cosine decay
    from lr to min_lr at max_iters."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(module, weight_decay):
    """AdamW groups: decay matrices; no decay on gains, biases (1-D) or the (tied) token embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "wte" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_and_step(optimizer, parameters, grad_clip):
    """The end of every trainer's step: clip the global gradient norm to grad_clip (0 = off), step, and
    clear the gradients for the next backward pass."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE, built from the vendored file (nothing is ever downloaded) and cut to
# its first VOCAB_SIZE - 1 ranks, with <|endoftext|> as the last id. A BPE cut after its first N merges is
# still a complete byte-level BPE: the 256 byte tokens come first, and every merged token is made of tokens
# of lower rank, so any string round-trips; the later merges (rarer words as one token) are simply not made.
# Why cut: Shakespeare's turns use only ~16k of GPT-2's 50,257 tokens, and with the full vocabulary a
# d=128 model spends ~86% of its FLOPs in the output layer, mostly on rows that are never trained.
# Chosen by measurement (2-core CPU, the cpu preset's model, the same 4.5-minute budget; held-out bits per
# character on the val plays, lower is better; README "Tokenizer" table):
#     vocabulary              tokens per turn   tokens/s   SFT steps in 4.5 min   bits per character
#     50,257 (GPT-2)          1.00x             see README
#      8,192 (chosen)         1.20x
#      4,096                  1.30x
VOCAB_SIZE = 8192
EOT = VOCAB_SIZE - 1  # <|endoftext|>: ends every reply (and pads batches)
TOKENIZER_NAME = f"gpt2-bpe-{VOCAB_SIZE}"   # recorded in every checkpoint: what its token ids mean
TOKENIZER_FILE = os.path.join(HERE, "data", "gpt2.tiktoken")
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_tokenizers = {}


def get_tokenizer(vocab_size=VOCAB_SIZE, path=TOKENIZER_FILE, expected_hash=TOKENIZER_SHA256):
    """tiktoken Encoding of GPT-2's BPE cut to `vocab_size` ids: ranks 0 .. vocab_size - 2, then
    <|endoftext|> = vocab_size - 1. vocab_size=50257 gives GPT-2's own tokenizer."""
    key = (vocab_size, path)
    if key in _tokenizers:
        return _tokenizers[key]
    import hashlib
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} is missing (it ships in data/; restore it with git)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected_hash:
        raise ValueError(f"tokenizer file {path} has sha256 {digest}, expected {expected_hash}: "
                         "the file is corrupt or not GPT-2's BPE")
    ranks = load_tiktoken_bpe(path, expected_hash=expected_hash)              # bytes -> rank, 50,256 of them
    if not 257 <= vocab_size <= len(ranks) + 1:
        raise ValueError(f"vocab_size must be in [257, {len(ranks) + 1}], got {vocab_size}")
    kept = {token: rank for token, rank in ranks.items() if rank < vocab_size - 1}
    enc = tiktoken.Encoding(name=f"gpt2-bpe-{vocab_size}", pat_str=GPT2_PATTERN, mergeable_ranks=kept,
                            special_tokens={"<|endoftext|>": vocab_size - 1}, explicit_n_vocab=vocab_size)
    _tokenizers[key] = enc
    return enc


# Chat format: Anthropic HH-RLHF transcripts, "\n\nHuman: ...\n\nAssistant: ...". A reply is encoded as
# " " + text + <|endoftext|>, so a prompt always ends with "Assistant:" and a reply starts with a space.
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def format_prompt(turns):
    """turns: list of strings, alternating human, assistant, human, ... ending with a human turn.
    Returns the transcript text ending in "\\n\\nAssistant:" ready for the model to reply."""
    if isinstance(turns, str):
        turns = [turns]
    text = ""
    for i, t in enumerate(turns):
        text += (HUMAN if i % 2 == 0 else ASSISTANT) + " " + t.strip()
    return text + ASSISTANT


def encode_reply(enc, reply):
    return enc.encode_ordinary(" " + reply.strip()) + [EOT]


# ----------------------------------------------------------------------------------------------------
# Settings: every script keeps its settings in a dataclass at the top and reads flags with this.

def yes_or_no(text):
    """A bool flag's value: true/false, yes/no, on/off, 1/0; anything else is an error, not a silent False."""
    import argparse
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def setting_comments(cls):
    """{field name: the comment after it in the source} for a settings dataclass and the ones it extends."""
    import inspect
    import re
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        comments.update(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(klass), re.M))
    return comments


def parse_settings(cls, presets=None, argv=None, doc=None, check=None):
    """Command-line flags from a settings dataclass: every field becomes `--name value` (also
    `--name-with-dashes`) whose help is the field's comment; `--flag` alone sets a bool. If `presets` is
    given (name -> dict of field values) the chosen preset ("auto" = gpu if CUDA is available, else cpu)
    fills in the fields the command line did not set. Then the settings are checked before any work
    starts: the device, the dtype, the output folder (it must be writable: a small file is tried), and
    check(s), the script's own rules, a list of problems. Any problem is one argparse error line naming
    the flag (exit status 2)."""
    import argparse
    comments = setting_comments(cls)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)                 # --block_s is no --block_size
    for f in fields(cls):
        is_bool = f.type is bool
        names = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        by_preset = "".join(f"; {name} preset: {p[f.name]}" for name, p in (presets or {}).items()
                            if f.name in p)
        parser.add_argument(*sorted(names), dest=f.name, default=argparse.SUPPRESS,
                            help=f"{comments.get(f.name, '')} (default: {f.default}{by_preset})",
                            type=yes_or_no if is_bool else f.type,
                            nargs="?" if is_bool else None, const=True if is_bool else None)  # --resume: true
    given = vars(parser.parse_args(argv))
    s = cls(**given)
    if presets is not None:
        preset = given.get("preset", cls.preset)
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() and given.get("device", "auto") != "cpu" else "cpu"
        if preset not in presets:
            parser.error(f"unknown preset {preset!r}; choose from auto, {', '.join(presets)}")
        s = cls(**{**presets[preset], **given, "preset": preset})
    problems = common_problems(s) + (check(s) if check else [])
    if problems:
        parser.error("; ".join(problems))
    return s


def nested_settings(flag, module, args, out_dir, preset):
    """(settings, problems) of the flags one trainer passes to another it runs first (train_ppo.py's
    --sft_args "..." for train_sft.py), parsed and checked by that trainer's own parser before any work."""
    import contextlib
    import io
    import shlex
    err = io.StringIO()
    try:
        argv = ["--out_dir", out_dir, "--preset", preset] + shlex.split(args)
        with contextlib.redirect_stderr(err):
            nested = parse_settings(module.Settings, module.PRESETS, argv, check=module.problems)
        if nested.out_dir != out_dir:                            # the outer run would not find what it writes
            return None, [f"{flag}: --out_dir is the outer run's own ({out_dir}); give it there"]
        return nested, []
    except (SystemExit, ValueError) as e:                                     # argparse's error line
        why = err.getvalue().strip().splitlines()[-1:] or [str(e)]
        return None, [f"{flag}: {why[0].split('error: ', 1)[-1]}"]


def common_problems(s):
    """The checks every script needs: numbers that are numbers, --device, --dtype, a writable --out_dir."""
    comments = setting_comments(type(s))
    problems = [f"--{f.name} must be a finite number, got {getattr(s, f.name)}" for f in fields(s)
                if f.type is float and not math.isfinite(getattr(s, f.name))
                and not (getattr(s, f.name) == math.inf and "inf = off" in comments.get(f.name, ""))]
    if getattr(s, "seed", 0) < 0:                          # numpy's generators take none below 0
        problems.append(f"--seed must be >= 0, got {s.seed}")
    device = getattr(s, "device", "auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu or cuda, not {device!r}")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                        "False); use --device cpu")
    if getattr(s, "dtype", "float32") not in ("float32", "bfloat16"):           # the scripts' autocast dtypes
        problems.append(f"--dtype must be float32 or bfloat16, not {s.dtype!r}")
    if hasattr(s, "out_dir"):
        try:
            check_writable_dir(s.out_dir)
        except OSError as e:
            problems.append(f"--out_dir {e}")
        problems += [f"--out_dir {s.out_dir}: {name} is a folder, not the checkpoint file the run reads or "
                     "writes" for name in ("sft.pt", "rm.pt", "ppo.pt")
                     if os.path.isdir(os.path.join(s.out_dir, name))]
    return problems


def check_writable_dir(path):
    """Create the folder if needed and write (then remove) a small file in it: OSError says why not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"{path} is a file, not a folder")
    probe = os.path.join(path, f".write_probe.{os.getpid()}")                # one per process (torchrun)
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"{path} is not writable ({e.strerror or e})") from None


def lock_out_dir(path):
    """One run per out_dir at a time: an exclusive lock on PATH/.lock, which names its holder. The kernel
    releases it when the holder's process ends, however it ends (kill -9 too), so a lock is never stale.
    Nested runs of one process (train_ppo.py running train_sft.py first) share it; unlock_out_dir() ends one.
    Where there is no fcntl (Windows), there is no lock."""
    key = os.path.realpath(path)
    if key in _out_dir_locks:
        _out_dir_locks[key][1] += 1
    elif fcntl is not None:
        import sys
        import time
        f = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OSError(f"--out_dir {path} is in use by {holder}: two runs in one folder would overwrite "
                          "each other's checkpoints; wait for it to end, or give another --out_dir") from None
        f.truncate(0)
        f.write(f"{os.path.basename(sys.argv[0]) or 'python'} (pid {os.getpid()}, since "
                f"{time.strftime('%H:%M:%S')})\n")
        f.flush()
        _out_dir_locks[key] = [f, 1]
    _held_out_dirs.append(key)


def unlock_out_dir(everything=False):
    """End the innermost run's hold on its out_dir (everything=True: all of this process's holds)."""
    while _held_out_dirs:
        key = _held_out_dirs.pop()
        entry = _out_dir_locks.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()                                              # closing the file unlocks it
                del _out_dir_locks[key]
        if not everything:
            return


_out_dir_locks = {}    # realpath -> [the open .lock file, how many nested runs hold it]
_held_out_dirs = []    # the out_dirs of this process's runs, innermost last


# ----------------------------------------------------------------------------------------------------
# More than one process: `torchrun --standalone --nproc_per_node=N train_sft.py` starts N copies of a script,
# each with RANK, LOCAL_RANK and WORLD_SIZE in its environment. torch.distributed connects them (NCCL between
# GPUs, gloo between CPU processes) and DDP averages the gradients of each backward pass across them. A plain
# `python train_sft.py` is a world of one: every helper below is then a no-op.

@dataclass
class World:
    rank: int = 0            # this process: 0 .. size - 1 (rank 0 logs, plots and writes checkpoints)
    size: int = 1            # processes in the run (torchrun's --nproc_per_node)
    local_rank: int = 0      # this process's number on its machine: the GPU it drives

    @property
    def main(self):
        return self.rank == 0

    def shard(self, items):
        """This process's share of a list: items rank, rank + size, rank + 2 size, ..."""
        return items[self.rank::self.size]


def start_run(cls, presets, argv, doc, check):
    """The first lines of every trainer: the settings (all checked before any work), this process's place
    among the processes of a torchrun run, the device; printed."""
    s = parse_settings(cls, presets, argv, doc=doc, check=check)
    w, device = start_world(s.device)
    if w.main:
        lock_out_dir(s.out_dir)                            # released by end_world(), or when the process ends
    print(f"preset: {s.preset} on {device}" + (f" x {w.size} processes" if w.size > 1 else "")
          + "  (override any setting with --name value; --help lists them)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()))
    return s, w, device


def run_script(main):
    """`python train_x.py`: run main(); an expected error (a missing or bad file, bad data, a run that
    diverged) is one `error: ...` line and exit status 1, not a traceback; Ctrl-C is one line and status 130
    (every checkpoint is written atomically, so the last one saved is whole)."""
    import signal
    import sys
    signal.signal(signal.SIGINT, signal.default_int_handler)          # imports done: Ctrl-C is main()'s
    try:
        main()
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:                 # torch's CPU and CUDA allocators: RuntimeErrors
        if out_of_memory(e) is None:
            raise
        sys.exit(f"error: {out_of_memory(e)}: make the run smaller (--batch_size, --block_size, the model's "
                 "--n_layer / --n_embd, --max_new_tokens)")
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): the checkpoints saved so far are whole; run again with --resume to "
              "continue from the last one", file=sys.stderr)
        sys.exit(130)


def out_of_memory(e):
    """The first line of an out-of-memory error (MemoryError, or torch's allocator on the CPU or a GPU), else
    None: what a script says in one line instead of a traceback."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return f"out of memory ({text[:160]})"
    return None


def world_size():
    """Processes in this run, from torchrun's environment (1 for a plain `python script.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_world(device_setting):
    """(World, device) for this process. Under torchrun: join the process group (nccl on CUDA, gloo on a CPU),
    drive GPU local_rank, silence print() on every rank but 0, and turn a SIGTERM (torchrun stops the others
    when one process dies) into a clean exit: a checkpoint is written atomically, so none is half-written."""
    global _world_users
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    device = ("cuda" if cuda else "cpu") if device_setting == "auto" else device_setting
    if world_size() == 1:
        return World(), device
    import signal
    import sys
    from datetime import timedelta
    import torch.distributed as dist
    w = World(int(os.environ["RANK"]), world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{w.local_rank}"
        torch.cuda.set_device(device)
    _world_users += 1
    if dist.is_initialized():                    # train_ppo.py running train_sft.py first: one process group
        return w, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=w.rank, world_size=w.size,
                            timeout=timedelta(minutes=10))
    if w.main:                                   # the data cache: built once, by process 0, before any reads
        from data.prepare import prepare
        prepare(verbose=False)
    dist.barrier()
    if not w.main:
        sys.stdout = open(os.devnull, "w")                                    # one rank logs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(
        f"error: process {w.rank} of {w.size} stopped: another process of the run ended (see its message "
        "above); every checkpoint on disk is whole"))
    return w, device


def all_sum(x):
    """x summed over the processes of a torchrun run (a new tensor); x itself in a plain run. Statistics of a
    whole batch are sums of the processes' sums and counts: this is where the processes talk, apart from
    DDP's gradient average (the collectives in ppo.py, train_*.py all come through here)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_shards(shard):
    """The inverse of World.shard over all processes: every process's results for its share of a list, back in
    the list's order, on every process (the list itself in a world of one)."""
    if world_size() == 1:
        return list(shard)
    import torch.distributed as dist
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(shard))
    out = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        out[r::len(parts)] = part                                         # rank r held items r, r + size, ...
    return out


def barrier():
    if world_size() > 1:
        import torch.distributed as dist
        dist.barrier()


def end_world():
    """The end of a run: release its out_dir (lock_out_dir) and leave the process group (the last of nested
    start_world calls does)."""
    global _world_users
    unlock_out_dir()
    if world_size() > 1:
        import torch.distributed as dist
        _world_users -= 1
        if _world_users == 0 and dist.is_initialized():
            dist.destroy_process_group()


_world_users = 0   # start_world calls not yet ended (train_ppo.py may run train_sft.py and train_rm.py first)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one dict per file; written atomically (to a temp file of the writer's own, then renamed over
# PATH, so a crash mid-write never leaves a half file) and loaded with weights_only=True (a checkpoint
# cannot run code).

def atomic_write(path, write):
    """Write a file atomically: write(tmp) fills a temp file of this process's own (PATH.<pid>.<random>.tmp,
    in the same folder), which is then renamed over PATH. Two writers never share a temp file, a reader sees
    the old file or the new one, never a half one, and a kill -9 mid-write leaves PATH as it was; a temp
    file left by a process that no longer runs is removed by the next write."""
    import glob
    import tempfile
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*.tmp")):
        pid = old[len(os.path.join(folder, name)) + 1:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(old)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())                          # on disk before the rename makes it PATH
        os.replace(tmp, path)
    except BaseException:                                 # Ctrl-C too: no temp file stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write a text file atomically (atomic_write)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def file_sha256(path):
    """The sha256 of a file, in hex: which sft.pt and rm.pt a ppo.pt was trained from."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid):
    """Whether a process with this pid runs (a temp file's writer, atomic_write)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # alive, another user's
        return True
    return True


def save_checkpoint(obj, path):
    """Write the dict `obj` to `path` atomically (atomic_write), recording the tokenizer its token ids belong
    to. A full disk or a folder that cannot be written is an OSError whose message names the path."""
    import errno
    import shutil
    try:
        atomic_write(path, lambda tmp: torch.save({**obj, "tokenizer": TOKENIZER_NAME}, tmp))
    except (OSError, RuntimeError) as e:                  # torch.save reports a full disk as a RuntimeError
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
        if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2 ** 20):
            left = f" ({free / 2 ** 20:.0f} MiB free)" if free is not None else ""
            raise OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device{left}; "
                                        f"{path} is unchanged") from None
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(getattr(e, "errno", None) or errno.EIO,
                      f"cannot write {path}: {reason}; {path} is unchanged") from None


MAX_WEIGHT = 1e3   # a trained model's weights stay far below this (here: below 10); beyond it a run diverged


def weights_problem(module):
    """None when every weight is finite and smaller than MAX_WEIGHT; else what is wrong with them. The
    trainers check this before every save, so a diverged run never replaces a checkpoint."""
    biggest = 0.0
    for p in module.parameters():
        if not bool(torch.isfinite(p).all()):
            return "not finite"
        biggest = max(biggest, float(p.detach().abs().max()))
    if biggest > MAX_WEIGHT:
        return f"as large as {biggest:.3g} (a trained model's stay far below {MAX_WEIGHT:g})"
    return None


def last_good(path):
    """What a run that diverged says about the checkpoint it leaves behind (only finite ones are written)."""
    if not os.path.exists(path):
        return f"No checkpoint was written ({path} does not exist)."
    made_by = {"sft.pt": "train_sft.py", "rm.pt": "train_rm.py"}.get(os.path.basename(path), "train_ppo.py")
    try:
        ckpt = load_checkpoint(path, made_by=made_by)
    except ValueError as e:
        return f"No good checkpoint is left: {e}."
    at = next((f" ({k} {ckpt[k]})" for k in ("step", "iter") if k in ckpt), "")
    return f"The last good checkpoint is {path}{at}, kept as it was."


# What each kind of checkpoint holds beyond model_args and model: the fields it needs to be loaded, and the
# fields --resume needs too. Every field is checked on load (present, of its type), so a file edited by hand
# or cut short is one line naming the file and the field, never a KeyError later.
NUMBER = (int, float)
LOAD_FIELDS = {"sft": {}, "ppo": {},
               "rm": {"head": dict, "reward_mean": NUMBER, "reward_std": NUMBER}}
RESUME_FIELDS = {"sft": {"optimizer": dict, "rng": dict, "step": int, "best_val_loss": NUMBER,
                         "config": dict},
                 "rm": {"optimizer": dict, "step": int, "config": dict, "history": list},
                 "ppo": {"critic": dict, "optimizer": dict, "kl_coef": NUMBER, "iter": int, "history": list,
                         "config": dict, "rng": torch.Tensor}}


def load_checkpoint(path, made_by, map_location="cpu", kind=None, resume=False):
    """Load a checkpoint dict; `made_by` names the script that writes it, for the error messages; `kind`
    ("sft", "rm", "ppo"), if given, is the kind of checkpoint expected, and its fields are checked
    (LOAD_FIELDS, and RESUME_FIELDS with resume=True): a bad file is a ValueError naming it and the field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found: run `python {made_by}` first to create it")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder, not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a broken file, or one that would need unpickling code: never load those
        raise ValueError(f"{path} is not a checkpoint this project wrote (it cannot be read as plain tensors "
                         f"and numbers: {type(e).__name__}); re-create it with `python {made_by}`") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) \
            or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a checkpoint this project wrote (no 'model_args'/'model' dicts); "
                         f"re-create it with `python {made_by}`")
    made_with = ckpt.get("tokenizer", f"gpt2-bpe-{ckpt['model_args'].get('vocab_size', '?')}")
    if made_with != TOKENIZER_NAME:  # its token ids would mean other words
        raise ValueError(f"{path} was made with another vocabulary ({made_with}); this code uses "
                         f"{TOKENIZER_NAME} (GPT-2's BPE cut to {VOCAB_SIZE:,} ids, see "
                         f"model.get_tokenizer): re-create it with `python {made_by}`")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt.get('kind', 'unknown')!s} checkpoint, not the {kind} checkpoint "
                         f"`python {made_by}` writes")
    needed = {**LOAD_FIELDS.get(kind, {}), **(RESUME_FIELDS[kind] if resume else {})}
    problem = checkpoint_problem(ckpt, needed)
    if problem:
        raise ValueError(f"{path} is damaged or was edited: {problem}; re-create it with `python {made_by}`")
    return ckpt


def checkpoint_problem(ckpt, needed):
    """None, or the first thing wrong with a checkpoint dict: a needed field missing or of the wrong type, a
    model_args that is no GPT's, weights whose names or shapes are not that GPT's, weights not finite."""
    for name, kind in needed.items():
        if name not in ckpt:
            return f"it has no {name!r}"
        if not isinstance(ckpt[name], kind) or isinstance(ckpt[name], bool):
            return f"its {name!r} is a {type(ckpt[name]).__name__}"
    for name in ("reward_mean", "reward_std", "best_val_loss", "kl_coef"):
        if name in needed and not math.isfinite(ckpt[name]):
            return f"its {name!r} is {ckpt[name]}"
    if "reward_std" in needed and not ckpt["reward_std"] > 0:
        return f"its 'reward_std' is {ckpt['reward_std']} (a spread of scores is > 0)"
    try:
        cfg = config_from_dict(ckpt["model_args"])
        with torch.device("meta"):                                            # shapes only, no memory
            expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        return f"its {str(e).splitlines()[0]}".replace("its checkpoint config", "its model_args")
    weights = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    if set(weights) != set(expected):
        odd = sorted(set(weights) ^ set(expected))[0]
        return f"its 'model' weights are not those of its model_args (e.g. {odd!r})"
    for group, prefix in (("model", ""), ("critic", "body."), ("head", None)):
        for k, v in (weights if group == "model" else ckpt.get(group, {})).items():
            if not isinstance(v, torch.Tensor):
                return f"its {group} weight {k!r} is a {type(v).__name__}, not a tensor"
            shape = expected.get(k[len(prefix):]) if prefix is not None and k.startswith(prefix) else None
            if shape is not None and v.shape != shape:
                return f"its {group} weight {k!r} has shape {tuple(v.shape)}, not {tuple(shape)}"
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"its {group} weight {k!r} is not finite"
    return None


def pyplot():
    """matplotlib.pyplot, drawing into files only (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Save a matplotlib figure to `path` atomically (a temp file, then a rename) and close it."""
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        pyplot().close(fig)


def config_from_dict(d):
    """A GPTConfig from a checkpoint's model_args, every field checked: a positive whole number (dropout a
    number in [0, 1), bias a bool), n_embd even and a multiple of n_head; ValueError says which not."""
    known = {f.name: f.type for f in fields(GPTConfig)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"checkpoint config has unknown fields {sorted(unknown)}")
    for k, v in d.items():
        if known[k] is bool:
            ok = isinstance(v, bool)
        elif known[k] is float:                                               # dropout
            ok = isinstance(v, NUMBER) and not isinstance(v, bool) and 0 <= v < 1
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if not ok:
            raise ValueError(f"model_args {k} = {v!r} is not a valid value")
    cfg = GPTConfig(**d)
    if cfg.n_embd % cfg.n_head or cfg.n_embd % 2:
        raise ValueError(f"model_args n_embd {cfg.n_embd} is not even and a multiple of n_head {cfg.n_head}")
    return cfg


def gpt_from_checkpoint(ckpt, prefix=""):
    """Rebuild a GPT from a checkpoint dict; `prefix` selects a sub-module's weights (e.g. 'body.')."""
    cfg = config_from_dict(ckpt["model_args"])
    model = GPT(cfg)
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}       # saved from a compiled model
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not match its config {asdict(cfg)}: {e}") from None
    return model
