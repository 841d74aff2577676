"""The fusion reranker: two-way cross-modal attention at several encoder depths, fused coarse-to-fine.

Data flow, for a configuration with three levels (three ViT blocks paired with three text blocks):

    index build:  encoder tokens ─ encode_image_store / encode_text_store ─> rerank store (fp16)
                  image (B, Lv, Ti, D), Ti = 1 + regions**2;  text (B, Lt, Tt, D) + mask (B, Tt)
    query time:   forward(image store, text store, mask) ─> match logit (B,)
                  score(match logit, recall cosine) ─> final score

Inside forward, levels are visited coarse to fine by default (deepest block first): the deepest
level's tokens start the running text and image states; each later level is mixed into those
states by a learned per-token sigmoid gate, and then a two-way block lets text tokens attend to
image regions and image regions attend to text tokens. With `attended_boxes`, each text token also
carries where it looked at the previous level (its attention-weighted region box), so that a later
level can compare two phrases' positions. The image CLS state and the masked mean of the text states,
with their product and difference, form the joint vector that an MLP turns into one match logit.

>>> cfg = get_fusion_config("fusion-tiny")
>>> model = FusionReranker(cfg).eval()
>>> img = model.encode_image_store([torch.randn(2, 17, 64)] * 2, grid=(4, 4))
>>> txt, mask = model.encode_text_store([torch.randn(2, 6, 64)] * 2, torch.ones(2, 6, dtype=torch.bool))
>>> model(img, txt, mask).shape
torch.Size([2])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from itm.common.errors import UnknownModelError

from .store_encoder import StoreEncoder

CONFIG_DIR = Path(str(files(__package__) / "fusion_configs"))
FUSION_ORDERS = ("coarse_to_fine", "fine_to_coarse")
STORE_BYTES = 2  # the rerank store keeps features as fp16


@dataclass(frozen=True)
class FusionConfig:
    name: str  # registry name (the JSON file's stem), recorded in checkpoints
    image_layers: tuple[int, ...]  # ViT blocks to store, listed shallow to deep; negative counts from the top
    text_layers: tuple[int, ...]  # text blocks, shallow to deep; level i pairs image_layers[i] with text_layers[i]
    image_width: int  # width Wv of the image tower's tokens (take it from the encoder)
    text_width: int  # width Wt of the text tower's tokens (take it from the encoder)
    d_model: int  # width D of the stored features and of every fusion layer
    heads: int  # attention heads; must divide d_model
    ff_mult: int  # feed-forward hidden width is ff_mult * d_model
    regions: int  # the patch grid is average-pooled to regions x regions; Ti = 1 + regions**2 (CLS first)
    max_text_tokens: int  # stored text length Tt; longer texts keep their first Tt-1 tokens and the EOT token
    fusion_order: str  # "coarse_to_fine": deepest level first, shallower ones refine it; or "fine_to_coarse"
    self_attention: bool  # add a self-attention layer per stream before each level's cross-attention
    score_weight: float  # final score = recall cosine + score_weight * match logit
    dropout: float  # dropout on attention and feed-forward outputs, in training only
    region_boxes: bool = False  # add a linear embedding of each region's box (centre, size), as LXMERT does
    pair_relations: bool = False  # the head also reads a relation network over pairs of image regions
    attended_boxes: bool = False  # after each level but the last, text tokens add an embedding of where they looked

    def __post_init__(self) -> None:
        if len(self.image_layers) != len(self.text_layers) or not self.image_layers:
            raise ValueError(f"fusion config {self.name}: image_layers and text_layers must pair up one to one")
        for layers in (self.image_layers, self.text_layers):
            same_sign = all(i < 0 for i in layers) or all(i >= 0 for i in layers)
            if same_sign and list(layers) != sorted(set(layers)):
                raise ValueError(f"fusion config {self.name}: layers {list(layers)} must be listed shallow to deep")
        if self.d_model % self.heads:
            raise ValueError(f"fusion config {self.name}: heads ({self.heads}) must divide d_model ({self.d_model})")
        if self.fusion_order not in FUSION_ORDERS:
            raise ValueError(f"fusion config {self.name}: fusion_order must be one of {', '.join(FUSION_ORDERS)}")
        if self.max_text_tokens < 2 or self.regions < 1:
            raise ValueError(f"fusion config {self.name}: needs max_text_tokens >= 2 and regions >= 1")

    @property
    def n_levels(self) -> int:
        return len(self.image_layers)

    @property
    def image_tokens(self) -> int:
        return 1 + self.regions**2

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionConfig":
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"unknown fusion config fields {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def list_fusion_models() -> list[str]:
    """Names of the registered fusion configs, e.g. ['fusion-base', 'fusion-tiny']."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_fusion_config(name: str, **overrides: Any) -> FusionConfig:
    """A registered config, with fields replaced by `overrides` (the encoder's widths, usually).

    >>> get_fusion_config("fusion-base", image_width=192, text_width=128).d_model
    128
    """
    path = CONFIG_DIR / f"{name}.json"
    if name not in list_fusion_models():
        raise UnknownModelError(
            f"unknown fusion model {name!r}; choose one of: {', '.join(list_fusion_models())}")
    cfg = FusionConfig.from_dict({"name": name, **json.loads(path.read_text())})
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def bytes_per_image(cfg: FusionConfig) -> int:
    """Rerank-store bytes for one image: Lv levels x Ti tokens x D, fp16."""
    return cfg.n_levels * cfg.image_tokens * cfg.d_model * STORE_BYTES


def bytes_per_text(cfg: FusionConfig) -> int:
    """Rerank-store bytes for one text: Lt levels x Tt tokens x D fp16, plus a one-byte mask per token."""
    return cfg.n_levels * cfg.max_text_tokens * cfg.d_model * STORE_BYTES + cfg.max_text_tokens


def region_boxes(regions: int) -> Tensor:
    """(1 + regions**2, 4) boxes (centre x, centre y, width, height) in [-1, 1] image coordinates:
    the whole image for the CLS token, then the pooled regions row by row."""
    step = 2 / regions
    centres = -1 + step * (torch.arange(regions) + 0.5)  # (R,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack([x.flatten(), y.flatten(), torch.full((regions**2,), step), torch.full((regions**2,), step)], 1)
    return torch.cat([torch.tensor([[0.0, 0.0, 2.0, 2.0]]), grid])


class Attention(nn.Module):
    """Multi-head attention whose query and context batches broadcast: a batch-1 side is computed once."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None = None,
                weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attended values (B*, Tq, D); with `weights`, also the attention averaged over heads (B*, Tq, Tk)."""
        # x (B, Tq, D); ctx (B', Tk, D); ctx_mask (B', Tk), True = attend
        return self.attend(self.queries(x), *self.keys_values(ctx), ctx_mask, weights)

    def queries(self, x: Tensor) -> Tensor:
        """(B, h, Tq, dh) from x (B, Tq, D)."""
        return self.q(x).view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def keys_values(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """2 x (B', h, Tk, dh) from ctx (B', Tk, D)."""
        return self.kv(ctx).view(*ctx.shape[:2], 2, self.heads, -1).permute(2, 0, 3, 1, 4)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx_mask: Tensor | None = None,
               weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """`forward` from `queries` and `keys_values`."""
        att = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B*, h, Tq, Tk), B* = max(B, B')
        if ctx_mask is not None:
            # finfo.min rather than -inf: masked keys get exactly zero weight, and no row can turn NaN
            att = att.masked_fill(~ctx_mask[:, None, None, :], torch.finfo(att.dtype).min)
        att = att.softmax(-1)
        y = (att @ v).transpose(1, 2)  # (B*, Tq, h, dh)
        y = self.drop(self.out(y.reshape(*y.shape[:2], -1)))  # (B*, Tq, D)
        return (y, att.mean(1)) if weights else y


def feed_forward(d: int, mult: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d), nn.Dropout(dropout))


class TwoWayBlock(nn.Module):
    """One level of interaction: text attends to image regions and image regions attend to text.

    Both directions read the same (pre-norm) inputs, so neither stream sees the other's update first.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.heads, cfg.dropout
        if cfg.self_attention:
            self.text_self_norm, self.image_self_norm = nn.LayerNorm(d), nn.LayerNorm(d)
            self.text_self, self.image_self = Attention(d, h, p), Attention(d, h, p)
        self.self_attention = cfg.self_attention
        self.text_norm, self.image_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.text_from_image, self.image_from_text = Attention(d, h, p), Attention(d, h, p)
        self.text_ff_norm, self.image_ff_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.text_ff, self.image_ff = feed_forward(d, cfg.ff_mult, p), feed_forward(d, cfg.ff_mult, p)

    def forward(self, t: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """New text and image states, and where each text token looked: (B, Tt, Ti), averaged over heads."""
        # t (B, Tt, D) text states; v (B, Ti, D) image states; mask (B, Tt) True for real text tokens
        return self.cross(*self.self_attend(t, v, mask), mask)

    def self_attend(self, t: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Each stream attending to itself (or as it is, without self-attention): text and image apart."""
        if self.self_attention:
            tn, vn = self.text_self_norm(t), self.image_self_norm(v)
            t, v = t + self.text_self(tn, tn, mask), v + self.image_self(vn, vn)
        return t, v

    def cross(self, t: Tensor, v: Tensor, mask: Tensor,
              pairs: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` after `self_attend`: the two-way attention and the feed-forward layers. With `pairs`
        (image rows, text rows), t, mask and v are per item and what comes back per pair: the norms and
        the attention's projections run once per item."""
        tn, vn = self.text_norm(t), self.image_norm(v)
        tq, tkv = self.text_from_image.queries(tn), self.image_from_text.keys_values(tn)
        vq, vkv = self.image_from_text.queries(vn), self.text_from_image.keys_values(vn)
        if pairs is not None:
            image_idx, text_idx = pairs
            t, mask, tq, *tkv = (x.index_select(0, text_idx) for x in (t, mask, tq, *tkv))
            v, vq, *vkv = (x.index_select(0, image_idx) for x in (v, vq, *vkv))
        seen, looked = self.text_from_image.attend(tq, *vkv, weights=True)
        t, v = t + seen, v + self.image_from_text.attend(vq, *tkv, mask)
        t = t + self.text_ff(self.text_ff_norm(t))  # (B, Tt, D)
        v = v + self.image_ff(self.image_ff_norm(v))  # (B, Ti, D)
        return t, v, looked


class LevelGate(nn.Module):
    """Mixes one level's stored tokens into the running state: state + g * proj(level), g in (0, 1) per channel.

    Tokens line up across levels (the same text positions, the same image regions), so the gate is
    decided token by token from both the running state and the incoming level.
    """

    def __init__(self, d: int):
        super().__init__()
        self.state_norm, self.level_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.gate_state = nn.Linear(d, d)
        self.gate_level = nn.Linear(d, d, bias=False)

    def forward(self, state: Tensor, level: Tensor) -> Tensor:
        return self.mix(state, *self.incoming(level))

    def incoming(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """What the gate takes from the level's tokens alone: the projected tokens and their share of the gate."""
        x = self.proj(self.level_norm(level))  # (B', T, D)
        return x, self.gate_level(x)

    def mix(self, state: Tensor, x: Tensor, x_gate: Tensor) -> Tensor:
        """`forward` from `incoming`'s output."""
        g = torch.sigmoid(self.gate_state(self.state_norm(state)) + x_gate)  # (B, T, D)
        return state + g * x


class PairRelations(nn.Module):
    """A relation network over ordered pairs of image regions (Santoro et al., 2017), asked by the text.

    For regions i != j: g(state_i, state_j, box_i - box_j, text) per pair, max-pooled over pairs.
    After the two-way blocks a region's state says which words it answers to, so "A left of B"
    becomes: some pair whose first region answers to A and second to B, with box_i left of box_j.
    """

    def __init__(self, d: int, regions: int):
        super().__init__()
        self.norm, self.text_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.first, self.second = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.geometry, self.text = nn.Linear(4, d, bias=False), nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d)
        boxes = region_boxes(regions)[1:]  # (R, 4)
        offsets = boxes[:, None] - boxes[None]  # (R, R, 4) box_i - box_j
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("distinct", ~torch.eye(len(boxes), dtype=torch.bool), persistent=False)

    def forward(self, regions: Tensor, text: Tensor) -> Tensor:
        # regions (B', R, D) image region states; text (B', D) text summary; B' broadcasts
        x = self.norm(regions)
        pair = (self.first(x)[:, :, None] + self.second(x)[:, None]  # (B', R, R, D)
                + self.geometry(self.offsets.to(x.dtype)) + self.text(self.text_norm(text))[:, None, None])
        g = self.out(torch.nn.functional.gelu(pair))  # (B, R, R, D)
        return g.masked_fill(~self.distinct[..., None], torch.finfo(g.dtype).min).amax((1, 2))  # (B, D)


class FusionReranker(nn.Module):
    """Scores row-aligned (image, text) pairs from their rerank-store features."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.n_levels
        # the store encoder lives in indexer, which runs it at build time from this checkpoint's "store." tensors
        self.store = StoreEncoder(n, cfg.image_width, cfg.text_width, d, cfg.regions, cfg.max_text_tokens)
        self.image_pos = nn.Parameter(torch.randn(cfg.image_tokens, d) * 0.02)  # (Ti, D)
        if cfg.region_boxes or cfg.attended_boxes:
            self.register_buffer("boxes", region_boxes(cfg.regions), persistent=False)  # (Ti, 4)
        if cfg.region_boxes:
            # geometry as coordinates, not only as learned ids: "left of" becomes a comparison of numbers
            self.box_embed = nn.Linear(4, d)
        if cfg.attended_boxes:
            # each text token's attention-weighted box: where "red circle" looked, as numbers the next
            # level's text self-attention can compare ("left of" = one phrase's x below the other's);
            # zero at the start, so training begins from the model without it
            self.looked_embed = nn.Linear(4, d)
            nn.init.zeros_(self.looked_embed.weight)
            nn.init.zeros_(self.looked_embed.bias)
        self.text_pos = nn.Parameter(torch.randn(cfg.max_text_tokens, d) * 0.02)  # (Tt, D)
        deep_first = list(reversed(range(n)))
        self.order = deep_first if cfg.fusion_order == "coarse_to_fine" else deep_first[::-1]
        self.blocks = nn.ModuleList(TwoWayBlock(cfg) for _ in range(n))  # one per step of self.order
        self.text_gates = nn.ModuleList(LevelGate(d) for _ in range(n - 1))  # before steps 1..n-1
        self.image_gates = nn.ModuleList(LevelGate(d) for _ in range(n - 1))
        self.relations = PairRelations(d, cfg.regions) if cfg.pair_relations else None
        width = 5 * d if cfg.pair_relations else 4 * d
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d), nn.GELU(), nn.Linear(d, 1))

    def encode_image_store(self, tokens: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
        """Store features for images: one (B, 1+H*W, Wv) tensor per configured layer -> (B, Lv, Ti, D).

        Per level: LayerNorm, the H x W patch grid average-pooled to regions x regions after the
        CLS token, Linear to d_model. Differentiable, so training can run it on the fly.
        """
        return self.store.encode_images(tokens, grid)

    def encode_text_store(self, tokens: Sequence[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """Store features for texts: one (B, L, Wt) tensor per layer + prefix mask (B, L) -> (B, Lt, Tt, D), (B, Tt).

        Per level: LayerNorm + Linear to d_model. A text longer than Tt keeps its first Tt-1 tokens
        and its EOT token; padding is stored as zeros.
        """
        return self.store.encode_texts(tokens, mask)

    def forward(self, image_feats: Tensor, text_feats: Tensor, text_mask: Tensor, attention: bool = False,
                pairs: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Match logits (B,) for row-aligned pairs of store features.

        image_feats (B, Lv, Ti, D), text_feats (B, Lt, Tt, D), text_mask (B, Tt) bool. Either side
        may have batch 1 and is then shared by every row (pass the query once, not k copies). Inputs
        are cast to the parameters' dtype, so fp16 store tensors can be passed as they are. With
        `attention`, also each level's text-to-image attention, (B, Tt', Ti) averaged over heads,
        Tt' the stored text length cut after the last real token (what a grounding loss supervises).

        With `pairs` (image rows, text rows), (P,) each, the logits are those of the P pairs they name
        (the same as indexing the features first): what depends on one side alone (the first level's
        self-attention and the norms and projections its cross-attention starts from, the later levels'
        gate inputs) is computed once per image and per text, not once per pair: a training batch scores
        each item in several pairs.
        """
        dtype = self.image_pos.dtype
        image_feats, text_feats, text_mask = image_feats.to(dtype), text_feats.to(dtype), text_mask.bool()
        # positions after the last real token of every row change nothing: drop them (captions are short)
        tt = int(text_mask.any(0).nonzero().max()) + 1 if text_mask.any() else 1
        text_feats, text_mask = text_feats[:, :, :tt], text_mask[:, :tt]
        first, *rest = self.order
        pos = self.image_pos + self.box_embed(self.boxes.to(dtype)) if self.cfg.region_boxes else self.image_pos
        # each side alone: the first level's states after self-attention, and each later level's gate input
        t, v = self.blocks[0].self_attend(text_feats[:, first] + self.text_pos[:tt], image_feats[:, first] + pos,
                                          text_mask)  # (B, Tt, D), (B, Ti, D)
        text_in = [gate.incoming(text_feats[:, level]) for gate, level in zip(self.text_gates, rest)]
        image_in = [gate.incoming(image_feats[:, level]) for gate, level in zip(self.image_gates, rest)]
        t, v, looked = self.blocks[0].cross(t, v, text_mask, pairs)
        if pairs is not None:  # from here on, one row per pair (index_select: its gradient adds rows faster)
            image_idx, text_idx = pairs
            text_mask = text_mask.index_select(0, text_idx)
            text_in = [(x.index_select(0, text_idx), g.index_select(0, text_idx)) for x, g in text_in]
            image_in = [(x.index_select(0, image_idx), g.index_select(0, image_idx)) for x, g in image_in]
        maps = [looked]
        for step in range(1, len(self.order)):
            if self.cfg.attended_boxes:
                t = t + self.looked_embed(maps[-1] @ self.boxes.to(dtype))  # (B, Tt, 4) -> (B, Tt, D)
            t = self.text_gates[step - 1].mix(t, *text_in[step - 1])  # (B, Tt, D)
            v = self.image_gates[step - 1].mix(v, *image_in[step - 1])  # (B, Ti, D)
            t, v, looked = self.blocks[step](t, v, text_mask)
            maps.append(looked)
        real = text_mask[..., None]  # (B, Tt, 1)
        text_vec = t.masked_fill(~real, 0).sum(1) / real.sum(1).clamp_min(1)  # (B, D)
        v0, tv = torch.broadcast_tensors(v[:, 0], text_vec)  # (B, D) each
        # the product and difference give the head a direct comparison of the two streams, so training
        # does not sit on the constant-logit plateau while cross-attention learns to align them
        joint = [v0, tv, v0 * tv, (v0 - tv).abs()]  # 4 x (B, D)
        if self.relations is not None:
            joint.append(self.relations(v[:, 1:], tv))  # (B, D)
        logits = self.head(torch.cat(joint, -1)).squeeze(-1)  # (B,)
        return (logits, maps) if attention else logits

    def score(self, match_logit: Tensor, recall_sim: Tensor, weight: float | None = None) -> Tensor:
        """Final ranking score: recall_sim + weight * match_logit (weight defaults to cfg.score_weight).

        As BLIP adds its ITM score to the ITC similarity; weight 0 ranks by recall alone.
        """
        return recall_sim + (self.cfg.score_weight if weight is None else weight) * match_logit
