"""Model identity: which dual encoder made a set of embeddings, as an index's manifest records it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """The dual encoder an index was built with; later builds and every query must use the same weights."""

    arch: str  # open_clip architecture
    pretrained: str | None  # open_clip pretrained tag or "random"; None when the weights came from a checkpoint
    checkpoint_sha256: str | None  # sha256 of the checkpoint file the weights came from
    embed_dim: int
    image_size: int  # input side of the image tower, pixels
    context_length: int  # text tokens the tokenizer pads to
    name: str | None = None  # the bundle name the user gave (e.g. "demo"), which later builds reload by name
    checkpoint: str | None = None  # a checkpoint path given directly, not through a bundle

    @property
    def label(self) -> str:
        """How messages name the model: `demo (itm-demo/checkpoint 3f2a9c0d1e4b)`, `ViT-B-32/laion2b_s34b_b79k`."""
        weights = f"checkpoint {self.checkpoint_sha256[:12]}" if self.checkpoint_sha256 else self.pretrained
        return f"{self.name} ({self.arch}/{weights})" if self.name else f"{self.arch}/{weights}"

    def same_weights(self, other: ModelIdentity) -> bool:
        return (self.arch, self.pretrained, self.checkpoint_sha256, self.embed_dim) == \
            (other.arch, other.pretrained, other.checkpoint_sha256, other.embed_dim)
