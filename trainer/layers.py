"""The fusion module's layers: multi-head attention, the ViT feed-forward block, the cross-fusion layer
(paper Eq. 4-6) and the single-stream self-attention layer of the no_text / no_image variants."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Att(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V with Q from `q_src`, K and V from `kv_src` (Eq. 4-5)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, p, _ = x.shape
        return x.view(b, p, self.heads, self.head_dim).transpose(1, 2)  # (B, H, P, dh)

    def forward(
        self,
        q_src: torch.Tensor,
        kv_src: torch.Tensor,
        need_weights: bool = False,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (B, P, W), weights (B, H, P, P) or None). Rows of the weights sum to 1.
        bias: added to the attention logits before the softmax, broadcast to (B, H, P, P) (e.g. (B, H,
        1, P): one term per key, the query-aware similarity bias of `RetFormer`)."""
        q, k, v = (
            self._split(self.q_proj(q_src)),
            self._split(self.k_proj(kv_src)),
            self._split(self.v_proj(kv_src)),
        )
        drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            # Explicit path: the fused kernel does not expose the softmax.
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            weights = torch.softmax(logits if bias is None else logits + bias, dim=-1)
            out = F.dropout(weights, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        b, _, p, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, p, -1)), weights


class FeedForward(nn.Module):
    """ViT MLP block: Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossFusionLayer(nn.Module):
    """One retrieval cross-fusion layer (Eq. 5-6): each stream attends to its own keys/values with the
    other stream's queries; both updates read the same input states."""

    def __init__(self, width: int, heads: int, ffn: bool, ffn_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm_img = nn.LayerNorm(width)
        self.norm_txt = nn.LayerNorm(width)
        self.attn_img = MultiHeadAttention(width, heads, dropout)  # Att(Q_T, K_I, V_I)
        self.attn_txt = MultiHeadAttention(width, heads, dropout)  # Att(Q_I, K_T, V_T)
        self.drop = nn.Dropout(dropout)
        self.ffn = ffn
        if ffn:
            self.ffn_norm_img = nn.LayerNorm(width)
            self.ffn_norm_txt = nn.LayerNorm(width)
            self.ffn_img = FeedForward(width, ffn_hidden, dropout)
            self.ffn_txt = FeedForward(width, ffn_hidden, dropout)

    def forward(
        self,
        x_img: torch.Tensor,
        x_txt: torch.Tensor,
        need_weights: bool = False,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
        h_img, h_txt = self.norm_img(x_img), self.norm_txt(x_txt)
        a_img, w_img = self.attn_img(h_txt, h_img, need_weights, bias)
        a_txt, w_txt = self.attn_txt(h_img, h_txt, need_weights, bias)
        x_img = x_img + self.drop(a_img)
        x_txt = x_txt + self.drop(a_txt)
        if self.ffn:
            x_img = x_img + self.ffn_img(self.ffn_norm_img(x_img))
            x_txt = x_txt + self.ffn_txt(self.ffn_norm_txt(x_txt))
        return x_img, x_txt, (w_img, w_txt)


class SelfAttentionLayer(nn.Module):
    """Pre-LN transformer encoder layer: the single-stream ("no_text" / "no_image") form."""

    def __init__(self, width: int, heads: int, ffn: bool, ffn_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.ffn = ffn
        if ffn:
            self.ffn_norm = nn.LayerNorm(width)
            self.ffn_block = FeedForward(width, ffn_hidden, dropout)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm(x)
        a, w = self.attn(h, h, need_weights, bias)
        x = x + self.drop(a)
        if self.ffn:
            x = x + self.ffn_block(self.ffn_norm(x))
        return x, w
