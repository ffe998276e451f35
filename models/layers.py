"""Transformer layers shared by the three detectors.

Standard-attention layers (DAB-DETR: conditional cross-attention of Meng et al. 2021 with
DAB-DETR's anchor-derived positional queries) and deformable layers (Deformable DETR, DINO).
All are post-norm, as in the original implementations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deformable_attention import MultiScaleDeformableAttention


class MLP(nn.Module):
    """A few Linear layers with ReLU in between (the box heads and positional heads of DETRs)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FeedForward(nn.Module):
    """Position-wise FFN with residual and post-norm.

    ``activation``: ``relu`` (DETR, Deformable DETR, DINO) or ``prelu`` (DAB-DETR's default
    ``--transformer_activation prelu``: one learned slope per layer, ``nn.PReLU()``;
    IDEA-Research/DAB-DETR main.py and models/DAB_DETR/transformer.py ``_get_activation_fn``).
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        if activation not in ("relu", "prelu"):
            raise ValueError(f"FFN activation must be relu or prelu, got {activation!r}")
        self.activation = nn.PReLU() if activation == "prelu" else None

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        hidden = F.relu(hidden) if self.activation is None else self.activation(hidden)
        return self.norm(x + self.dropout(self.linear2(self.dropout(hidden))))


def split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over [B,H,T,E] tensors; ``allowed`` is True where a query may
    look (broadcastable to [B,H,Tq,Tk]). Weights are computed explicitly only when asked for."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), None
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(-1)
    return weights @ v, weights


class SelfAttention(nn.Module):
    """Multi-head self-attention taking an optional [B,T,T] *blocked* mask (True = blocked)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attn_dropout: float = 0.0):
        """``dropout``: on the output (the layer's residual branch); ``attn_dropout``: on the
        attention probabilities, as ``nn.MultiheadAttention(dropout=...)`` does in the originals'
        decoders (fundamentalvision/Deformable-DETR models/deformable_transformer.py)."""
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None = None) -> Tensor:
        h = self.n_heads
        allowed = None if blocked is None else ~blocked[:, None]
        q, k, v = split_heads(self.q_proj(q), h), split_heads(self.k_proj(k), h), split_heads(self.v_proj(v), h)
        if self.training and self.attn_dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout)
        else:
            out, _ = attend(q, k, v, allowed, need_weights=False)
        return self.dropout(self.out_proj(merge_heads(out)))


class EncoderLayer(nn.Module):
    """Standard DETR encoder layer: positional embedding added to queries and keys."""

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        qk = src + pos
        blocked = padding_mask[:, None, :].expand(-1, src.shape[1], -1)
        src = self.norm(src + self.self_attn(qk, qk, src, blocked))
        return self.ffn(src)


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR encoder layer: multi-scale deformable self-attention over all levels."""

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        out, _ = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        return self.ffn(self.norm(src + self.dropout(out)))


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (with the group mask), then deformable cross-attention."""

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, n_levels: int, n_points: int):
        super().__init__()
        # nn.MultiheadAttention(d_model, n_heads, dropout=dropout) in the original decoder layer:
        # dropout on the attention probabilities too (Deformable-DETR models/deformable_transformer.py)
        self.self_attn = SelfAttention(d_model, n_heads, dropout, attn_dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_padding_mask,
                self_attn_mask=None, return_attention=False, point_queries=None):
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, self_attn_mask))
        out, attention = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                         memory_padding_mask, return_attention, point_queries)
        tgt = self.norm2(tgt + self.dropout(out))
        return self.ffn(tgt), attention


class ConditionalDecoderLayer(nn.Module):
    """DAB-DETR decoder layer (Liu et al., 2022; conditional cross-attention of Meng et al., 2021).

    Content and positional parts are projected separately; in cross-attention they are
    *concatenated* per head, so the positional part (the anchor's sine embedding, scaled and
    modulated by the anchor's width/height) forms its own attention term.
    """

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.n_heads = n_heads
        lin = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent, self.sa_qpos, self.sa_kcontent, self.sa_kpos, self.sa_v = (lin() for _ in range(5))
        self.sa_out = lin()
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_qcontent, self.ca_qpos, self.ca_kcontent, self.ca_kpos, self.ca_v = (lin() for _ in range(5))
        self.ca_qpos_sine = lin()
        self.ca_out = lin()
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def forward(self, tgt, query_pos, query_sine_embed, memory, memory_pos, memory_padding_mask,
                self_attn_mask=None, return_attention=False):
        h = self.n_heads
        # self-attention
        q = self.sa_qcontent(tgt) + self.sa_qpos(query_pos)
        k = self.sa_kcontent(tgt) + self.sa_kpos(query_pos)
        allowed = None if self_attn_mask is None else ~self_attn_mask[:, None]
        out, _ = attend(split_heads(q, h), split_heads(k, h), split_heads(self.sa_v(tgt), h), allowed, False)
        tgt = self.norm1(tgt + self.dropout(self.sa_out(merge_heads(out))))
        # conditional cross-attention
        q = self.ca_qcontent(tgt)
        k = self.ca_kcontent(memory)
        k_pos = self.ca_kpos(memory_pos)
        if self.ca_qpos is not None:
            q = q + self.ca_qpos(query_pos)
            k = k + k_pos
        q = torch.cat([split_heads(q, h), split_heads(self.ca_qpos_sine(query_sine_embed), h)], dim=-1)
        k = torch.cat([split_heads(k, h), split_heads(k_pos, h)], dim=-1)
        allowed = ~memory_padding_mask[:, None, None, :]
        out, weights = attend(q, k, split_heads(self.ca_v(memory), h), allowed, return_attention)
        tgt = self.norm2(tgt + self.dropout(self.ca_out(merge_heads(out))))
        attention = {"attention_weights": weights.transpose(1, 2).detach()} if return_attention else None
        return self.ffn(tgt), attention
