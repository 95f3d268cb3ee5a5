"""A fast CPU decoder for Llama-family models: bf16 weights, a static KV cache, no framework overhead.

Why this exists: on a CPU, decoding a 135M model through `transformers` is bound by
per-token overhead and fp32 weight traffic (~27 tok/s either way, bf16 weights did not
help there). A plain hand-written forward over the same weights in bf16 runs about 2x
faster (measured in docs/benchmarks.md). transformers does the training and every other
architecture; this file only serves the sampling loop in loopchat.generate.

It reads the weights of an HF LlamaForCausalLM (SmolLM2, Llama 2/3, TinyLlama, ...):
RMSNorm, rotary embeddings (default rope only), grouped-query attention, SwiGLU MLP, and
fuses q/k/v and gate/up into one matmul each. Left padding works as in generate.py: all
rows write the same cache slot each step, each row has its own rotary position
(cumsum of its mask - 1), and pad slots are masked out of attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """True if this decoder reproduces the model's forward exactly (up to dtype)."""
    c = model.config
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    return (
        c.model_type == "llama"
        and not getattr(c, "attention_bias", False)
        and not getattr(c, "mlp_bias", False)
        and rope.get("rope_type", "default") == "default"
        and getattr(c, "hidden_act", "silu") == "silu"
        and getattr(c, "pretraining_tp", 1) == 1
    )


def default_dtype() -> torch.dtype:
    """bf16 where the CPU has native bf16 matmuls (AMX / AVX512-BF16), else fp32.

    bf16 rounding can flip a near-tie in greedy decoding (it is sampling-level noise);
    pass dtype=torch.float32 where outputs must match transformers exactly (evaluation).
    """
    from loopchat.models import native_bf16

    return torch.bfloat16 if native_bf16("cpu") else torch.float32


class FastLlama:
    def __init__(self, model, dtype: torch.dtype | None = None):
        if not supports(model):
            raise ValueError(f"FastLlama does not support this model ({model.config.model_type}); use the transformers backend")
        c = model.config
        self.dtype = dtype or default_dtype()
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        self.eps = c.rms_norm_eps
        rope = getattr(c, "rope_parameters", None) or {}
        self.theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        self.load_weights(model)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    @torch.no_grad()
    def load_weights(self, model) -> None:
        """Copy (and fuse) the weights; call again after the HF model is trained (PPO)."""
        m, dt = model.model, self.dtype
        w = lambda t: t.detach().to(dt).contiguous()  # noqa: E731
        self.embed = w(m.embed_tokens.weight)
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "ln1": layer.input_layernorm.weight.detach().float(),
                    "ln2": layer.post_attention_layernorm.weight.detach().float(),
                    "qkv": w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                    "o": w(a.o_proj.weight),
                    "gate_up": w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    "down": w(mlp.down_proj.weight),
                }
            )
        self.norm = m.norm.weight.detach().float()
        self.lm_head = self.embed if model.lm_head.weight is m.embed_tokens.weight else w(model.lm_head.weight)
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32, as HF does, then back to the compute dtype
        return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(self.dtype)

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    def reset(self, batch: int, max_len: int) -> None:
        """Allocate an empty cache for `batch` rows of up to `max_len` tokens."""
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.length = 0

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.k_cache = [k.index_select(0, keep) for k in self.k_cache]
        self.v_cache = [v.index_select(0, keep) for v in self.v_cache]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: (B, T) for the next T cache slots; key_mask: (B, length + T) bool,
        True where a slot holds a real token. Returns fp32 logits of the last position (B, V)."""
        B, T = input_ids.shape
        start, end = self.length, self.length + T
        G, hd = self.n_heads // self.n_kv, self.head_dim
        cos, sin = self._rope(positions)
        # causal over slots, and never attend to padding
        causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # (T, end)
        allowed = causal[None] & key_mask[:, None, :end]  # (B, T, end)
        # a pad query may see itself, so its (unused) row stays finite: a fully masked row
        # would give NaN, and NaN * 0 in a later probs @ V would poison real rows
        allowed[:, torch.arange(T), torch.arange(start, end)] = True
        bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))[:, None, None]
        x = F.embedding(input_ids, self.embed)
        scale = 1.0 / math.sqrt(hd)
        for i, L in enumerate(self.layers):
            h = self._rms(x, L["ln1"])
            q, k, v = F.linear(h, L["qkv"]).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], -1)
            q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
            k = k.view(B, T, self.n_kv, hd).transpose(1, 2)
            v = v.view(B, T, self.n_kv, hd).transpose(1, 2)
            q = q * cos + self._rotate(q) * sin
            k = k * cos + self._rotate(k) * sin
            self.k_cache[i][:, :, start:end] = k
            self.v_cache[i][:, :, start:end] = v
            kc, vc = self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end]
            # GQA without repeating K/V: the G query heads that share a kv head become extra rows
            scores = (q.reshape(B, self.n_kv, G * T, hd) @ kc.transpose(-1, -2)).float() * scale
            scores = scores.view(B, self.n_kv, G, T, end) + bias
            probs = torch.softmax(scores, -1).to(self.dtype).view(B, self.n_kv, G * T, end)
            o = (probs @ vc).view(B, self.n_heads, T, hd).transpose(1, 2).reshape(B, T, self.n_heads * hd)
            x = x + F.linear(o, L["o"])
            gate, up = F.linear(self._rms(x, L["ln2"]), L["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        self.length = end
        return F.linear(self._rms(x[:, -1], self.norm), self.lm_head).float()
