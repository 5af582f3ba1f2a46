"""
The GPT of the book ([实战框架 §4.1] transformer 架构), as in nanoGPT: LayerNorm, attention, MLP, Block, GPT.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128))
    logits = model(idx)                    # (B, T, vocab_size)
    loss = model(idx, targets, loss_mask)  # scalar, mean over masked target tokens
    h = model.hidden_states(idx)           # (B, T, n_embd): reward model and critic put scalar heads here

After the GPT: the trainers' learning rate, weight-decay groups and optimizer step, and a GPT rebuilt from a
checkpoint. Tokenizer and chat format: data/prepare.py; flags, torchrun, checkpoint files: data/plumbing.py.

What it simplifies: no rotary or learned positions, no grouped-query attention, no mixture of experts;
one attention implementation switch (`use_sdpa`) instead of a zoo of kernels.

Left padding: `pad` (B,) counts each row's pad tokens; they are never attended to and positions count from
the first real token, so a padded row computes what it would alone.
"""
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


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


# [实战框架 §4.1.2] position encoding: the sinusoidal positional encoding (nothing learned)
#   PE(pos, 2i)   = sin(pos / 10000^(2i/d_model))
#   PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))

def sinusoidal_positions(max_len, d_model):
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)             # (max_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)                  # (d_model/2,)
    angle = pos / (10000.0 ** (two_i / d_model))                              # (max_len, d_model/2)
    pe = torch.zeros(max_len, d_model)                                        # (max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe


class Positions(nn.Module):
    """What is added to each token's embedding to say where it stands: position ids (T,) or (B, T) ->
    (..., d_model). Exercise C4 edits THIS class: a learned table (an nn.Embedding(block_size, d_model) made
    in __init__, looked up in forward) or no positions at all. The table is a persistent buffer, saved in
    every checkpoint: one trained with other positions has other weight names and is refused by name."""

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(cfg.block_size, cfg.n_embd))   # (block_size, d)

    def forward(self, pos):
        return self.pe[pos]                                                   # (..., d)


# [实战框架 §4.1.1] self-attention 机制: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + causal mask) V
# (the causal mask, which lets a position see only itself and the past, is not in the book's formula)

def attention_mask(T_q, offset, pad, device):
    """Boolean mask (B or 1, 1, T_q, offset+T_q): True where query i may attend to key j: causal (j <= i)
    and never to a left-pad key, but always to itself (a pad query's softmax then has no NaN)."""
    q_pos = offset + torch.arange(T_q, device=device)                         # (T_q,)
    k_pos = torch.arange(offset + T_q, device=device)                         # (T_k,)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]                           # (1, T_q, T_k) causal
    if pad is not None:
        real = k_pos[None, None, :] >= pad[:, None, None]                     # (B, 1, T_k) key is not padding
        mask = (mask & real) | (k_pos[None, :] == q_pos[:, None])[None]       # (B, T_q, T_k)
    return mask.unsqueeze(1)                                                  # (B|1, 1, T_q, T_k)


class KVCache:
    """Keys and values of every position seen so far, so decoding token t costs O(t), not O(t^2)."""

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
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2)              # 3 x (B, nh, T, hs), from
                   for t in self.qkv(x).split(C, dim=2))                      # 3 x (B, T, d)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                             # (B, nh, T_k, hs), T_k >= T
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:  # fused kernel (flash / memory-efficient attention on GPU); no mask: plain causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=mask is None)                    # (B, nh, T, hs)
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


@dataclass
class GPTConfig:
    vocab_size: int = 8192   # VOCAB_SIZE: GPT-2's BPE cut to 8,191 tokens + <|endoftext|> (see get_tokenizer)
    block_size: int = 256     # longest sequence (context window) the model is trained on
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # model width d_model
    dropout: float = 0.0      # dropout on embeddings, attention weights and residual branches
    bias: bool = True         # biases in Linear layers and LayerNorm beta


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)                   # token embedding
        self.wpe = Positions(cfg)                                             # position encoding
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
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def set_sdpa(self, on):
        """Switch every attention layer between the fused SDPA kernel and the explicit math path."""
        for block in self.blocks:
            block.attn.use_sdpa = on

    def new_cache(self, batch_size, max_len=None):
        """An empty KV cache, in the autocast dtype (bf16) under autocast: half the bytes to read for free."""
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
        plain = pad is None and offset == 0                                   # plain causal: no mask
        mask = None if plain else attention_mask(T, offset, pad, idx.device)  # (B|1, 1, T, offset+T)
        x = self.wte(idx) * math.sqrt(self.config.n_embd) + self.wpe(pos)   # (B, T, d) x sqrt(d): Vaswani
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask, cache)                                         # (B, T, d)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)                                                   # (B, T, d)

    def forward(self, idx, targets=None, loss_mask=None, pad=None, cache=None):
        """Without targets: logits (B, T, vocab). With targets (B, T): mean cross-entropy over the positions
        where loss_mask (B, T) is True (all if None); only those go through the vocabulary projection."""
        h = self.hidden_states(idx, pad, cache)                               # (B, T, d)
        if targets is None:
            return self.lm_head(h)                                            # (B, T, V)
        # .bool(): a 0/1 integer mask (the uint8 *_mask.bin data) would index, not select
        loss_mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        logits = self.lm_head(h[loss_mask])                                   # (N, V) N = trained tokens
        return F.cross_entropy(logits.float(), targets[loss_mask])            # scalar


def lr_at(step, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup to lr over warmup_iters steps, then cosine decay from lr to min_lr at max_iters."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(module, weight_decay):
    """AdamW groups: decay matrices; no decay on gains, biases (1-D) or the (tied) token embedding."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():                                 # a tied weight comes once
        if p.requires_grad:
            (decay if p.dim() >= 2 and "wte" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_and_step(optimizer, parameters, grad_clip):
    """Clip the global gradient norm to grad_clip (0 = off), step, and clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Loading: a GPT from a checkpoint dict (data/plumbing.py loads and checks the file).

def config_from_dict(d):
    """A GPTConfig from a checkpoint's model_args, every field checked (a whole number >= 1, dropout in
    [0, 1), bias a bool; n_embd even and a multiple of n_head): ValueError says which not."""
    valid = {bool: lambda v: isinstance(v, bool),
             float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
             int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1}
    known = {f.name: valid[f.type] for f in fields(GPTConfig)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"checkpoint config has unknown fields {sorted(unknown)}")
    for k, v in d.items():
        if not known[k](v):
            raise ValueError(f"model_args {k} = {v!r} is not a valid value")
    cfg = GPTConfig(**d)
    if cfg.n_embd % cfg.n_head or cfg.n_embd % 2:
        raise ValueError(f"model_args n_embd {cfg.n_embd} is not even and a multiple of n_head {cfg.n_head}")
    return cfg


def with_positions(state, cfg, prefix=""):
    """A state dict from before the position table was saved (2026-12-02) has no 'wpe.pe' (under `prefix`,
    e.g. 'body.'): it was trained with the sinusoidal table, which is put in."""
    if not any(k.startswith(prefix + "wpe.") for k in state):
        state = {**state, prefix + "wpe.pe": sinusoidal_positions(cfg.block_size, cfg.n_embd)}
    return state


def gpt_from_checkpoint(ckpt, prefix=""):
    """Rebuild a GPT from a checkpoint dict; `prefix` selects a sub-module's weights (e.g. 'body.')."""
    cfg = config_from_dict(ckpt["model_args"])
    model = GPT(cfg)
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    state = with_positions({k.removeprefix("_orig_mod."): v for k, v in state.items()}, cfg)  # compiled
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not match its config {asdict(cfg)}: {e}") from None
    return model
