"""Token ids <-> images: PixelDLM's "text written as pixels".

Token i of a text is pixel i of an `image_size x image_size` image (row `i // image_size`, column
`i % image_size`), so an image holds `image_size**2` tokens (4096 at 64 x 64). A token id is written in base 256 over
the three channels with the high byte first, as upstream's checkpoints expect (upstream builds BGR arrays with
OpenCV): channel 0 = `id // 65536`, channel 1 = `(id // 256) % 256`, channel 2 = `id % 256`, each divided by 255,
so images are in [0, 1].

Encoding (as upstream trains): the text's ids, then EOS if it fits, then the pad token's colour (white when the
tokenizer has none) in every remaining pixel; the pixel mask is 1 on text and EOS. Sequences longer than the
capacity raise, or with `truncate=True` keep `capacity - 1` ids and end with EOS (upstream's truncation).

Decoding (ours; upstream's decoder truncates instead of rounding, lets negative values wrap around and never stops
at EOS): each channel is clamped to [0, 1] and rounded to the nearest of the 256 levels; reading stops at the first
EOS pixel; pad-coloured pixels and ids outside the vocabulary are padding and skipped. With `snap=True` a colour that
is not a vocabulary id, EOS or pad is first moved to the nearest one of those (Euclidean distance in RGB).
"""

from __future__ import annotations

import torch

__all__ = ["TextPixelCodec"]

_WHITE = 256**3 - 1


class TextPixelCodec:
    """Writes token ids into images and reads them back (see the module docstring).

    Args:
        vocab_size: ids `0 .. vocab_size - 1` are text tokens (upstream uses `tokenizer.vocab_size`, the base
            vocabulary without added special tokens).
        eos_token_id: the id that ends a text (appended on encoding, stops decoding), or None.
        pad_token_id: the id whose colour fills unused pixels, or None for white.
        image_size: side of the image; the capacity is `image_size**2` tokens.
    """

    def __init__(self, vocab_size: int, eos_token_id: int | None = None, pad_token_id: int | None = None, image_size: int = 64):
        for name, value in (("vocab_size", vocab_size), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if vocab_size > _WHITE:
            raise ValueError(f"vocab_size must be at most {_WHITE} (three 8-bit channels); got {vocab_size}.")
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _WHITE):
                raise ValueError(f"{name} must be None or an integer in [0, {_WHITE}]; got {value!r}.")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.capacity = image_size * image_size
        self._pad_id = _WHITE if pad_token_id is None else pad_token_id

    @classmethod
    def from_tokenizer(cls, tokenizer, image_size: int = 64) -> "TextPixelCodec":
        """The codec of a transformers tokenizer: its base `vocab_size`, `eos_token_id` and `pad_token_id`."""
        return cls(tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, image_size)

    # ----------------------------------------------------------------------------------------------- colours

    @staticmethod
    def ids_to_colors(ids: torch.Tensor) -> torch.Tensor:
        """(..., ) integer ids -> (..., 3) colours in [0, 1], high byte first."""
        ids = ids.long()
        levels = torch.stack([ids // 65536, (ids // 256) % 256, ids % 256], dim=-1)
        return levels.float() / 255.0

    @staticmethod
    def colors_to_ids(colors: torch.Tensor) -> torch.Tensor:
        """(..., 3) colours -> (..., ) ids, each channel clamped to [0, 1] and rounded to the nearest level."""
        levels = torch.round(colors.float().clamp(0.0, 1.0) * 255.0).long()
        return levels[..., 0] * 65536 + levels[..., 1] * 256 + levels[..., 2]

    # ---------------------------------------------------------------------------------------------- encoding

    def encode(
        self, token_ids: list[int] | list[list[int]], truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id sequence(s) -> `(images (B, 3, S, S) in [0, 1], pixel_mask (B, S, S) float)`."""
        if not isinstance(token_ids, (list, tuple)):
            raise ValueError(f"token_ids must be a list of ids or a list of such lists; got {type(token_ids).__name__}.")
        batch = [list(ids) for ids in token_ids] if token_ids and isinstance(token_ids[0], (list, tuple)) else [list(token_ids)]
        rows, lengths = [], []
        for ids in batch:
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= _WHITE for i in ids):
                raise ValueError(f"token ids must be integers in [0, {_WHITE}].")
            if len(ids) > self.capacity:
                if not truncate:
                    raise ValueError(
                        f"a sequence of {len(ids)} tokens does not fit an image of capacity {self.capacity}; shorten it "
                        "or pass truncate=True."
                    )
                end = [self.eos_token_id] if self.eos_token_id is not None else []
                ids = ids[: self.capacity - len(end)] + end
            elif self.eos_token_id is not None and len(ids) < self.capacity:
                ids = ids + [self.eos_token_id]
            lengths.append(len(ids))
            rows.append(ids + [self._pad_id] * (self.capacity - len(ids)))
        ids = torch.tensor(rows, dtype=torch.long)
        images = self.ids_to_colors(ids).reshape(len(rows), self.image_size, self.image_size, 3).permute(0, 3, 1, 2)
        mask = (torch.arange(self.capacity)[None] < torch.tensor(lengths)[:, None]).float()
        return images.contiguous(), mask.reshape(len(rows), self.image_size, self.image_size)

    def encode_text(self, tokenizer, texts: str | list[str], truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenizes `texts` without special tokens (as upstream) and encodes them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        return self.encode(ids, truncate=truncate)

    # ---------------------------------------------------------------------------------------------- decoding

    def _specials(self) -> list[int]:
        return sorted({i for i in (self.eos_token_id, self._pad_id) if i is not None and i >= self.vocab_size})

    def snap(self, colors: torch.Tensor) -> torch.Tensor:
        """(..., 3) colours -> (..., ) ids of the nearest vocabulary id, EOS or pad colour (in rounded levels; ties go
        to EOS / pad)."""
        levels = torch.round(colors.float().clamp(0.0, 1.0) * 255.0)
        ids = self.colors_to_ids(colors)
        top = self.vocab_size - 1
        tb, tg, tr = top // 65536, (top // 256) % 256, top % 256
        b, g, r = levels.unbind(-1)
        # EOS and pad first, so that they win ties (argmin keeps the first minimum).
        candidates = [
            (self.ids_to_colors(torch.tensor(special)) * 255.0).expand_as(levels) for special in self._specials()
        ]
        if tb > 0:  # every colour with a smaller high byte is in the vocabulary
            candidates.append(torch.stack([b.clamp(max=tb - 1), g, r], -1))
        if tg > 0:
            candidates.append(torch.stack([torch.full_like(b, tb), g.clamp(max=tg - 1), r], -1))
        candidates.append(torch.stack([torch.full_like(b, tb), torch.full_like(g, tg), r.clamp(max=tr)], -1))
        stacked = torch.stack(candidates)  # (K, ..., 3)
        best = ((stacked - levels[None]) ** 2).sum(-1).argmin(0)
        nearest = torch.gather(stacked, 0, best[None, ..., None].expand(1, *levels.shape)).squeeze(0).long()
        snapped = nearest[..., 0] * 65536 + nearest[..., 1] * 256 + nearest[..., 2]
        return torch.where(ids < self.vocab_size, ids, snapped)

    def decode(self, images: torch.Tensor, snap: bool = False) -> list[list[int]]:
        """(B, 3, S, S) or (3, S, S) images -> one list of text token ids per image (EOS and padding removed)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (B, 3, {self.image_size}, {self.image_size}); got {tuple(images.shape)}."
            )
        colors = images.detach().cpu().permute(0, 2, 3, 1).reshape(images.shape[0], self.capacity, 3)
        ids = self.snap(colors) if snap else self.colors_to_ids(colors)
        texts = []
        for row in ids.tolist():
            if self.eos_token_id is not None and self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            texts.append([i for i in row if i < self.vocab_size and i != self._pad_id])
        return texts

    def decode_text(self, tokenizer, images: torch.Tensor, snap: bool = False) -> list[str]:
        """Decodes images to token ids and those to strings with `tokenizer`."""
        return [tokenizer.decode(ids) for ids in self.decode(images, snap=snap)]
