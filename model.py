"""
A small transformer written by hand, in the manner of nanoGPT: token + learned position embedding,
n_layer pre-LayerNorm blocks, a final LayerNorm and an output head tied to the token embedding.

    x = wte(idx) + wpe(pos)                                   # (B, T, C)
    x = x + attn.out_proj(softmax(q k^T / sqrt(d) + mask) v)  # q, k, v = q_proj, k_proj, v_proj of ln_1(x)
    x = x + mlp.fc_out(gelu(mlp.fc_in(ln_2(x))))
    logits = ln_f(x) @ wte^T                                  # (B, T, vocab_size)

Query, key and value are three separate nn.Linear layers (not one fused c_attn) so that an
adapter, and the rank allocator, can treat each of W_q, W_k, W_v, W_o, W_f1, W_f2 on its own:
the six target names are q_proj, k_proj, v_proj, out_proj, fc_in, fc_out.

With bidirectional=True the causal mask is dropped and the same blocks form a BERT-style encoder:
forward() then gives masked-language-model logits (targets of -1 are ignored), and classify()
mean-pools the final hidden states into n_classes logits. The model knows nothing of adapters:
triadapt.inject() wraps its linears from outside. gpt2.py loads and writes GPT-2 checkpoints.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256      # bytes; an encoder adds one [MASK] id
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bidirectional: bool = False
    n_classes: int = 0         # > 0 adds a classification head on mean-pooled states
    gelu_approximate: str = "none"  # GPT-2's gelu_new is "tanh"
    ln_eps: float = 1e-5


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.q_proj = nn.Linear(config.n_embd, config.n_embd)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.causal = not config.bidirectional
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.gelu_approximate)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.cls_head = nn.Linear(config.n_embd, config.n_classes) if config.n_classes else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.hidden(idx))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def classify(self, idx, labels=None):
        # Mean pooling: byte snippets carry no [CLS] token, and every position sees the whole snippet.
        logits = self.cls_head(self.hidden(idx).mean(dim=1))  # (B, n_classes)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float() / temperature  # (B, vocab_size)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
