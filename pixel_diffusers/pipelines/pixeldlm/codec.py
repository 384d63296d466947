"""Token ids <-> images: PixelDLM's "text written as pixels".

Token i of a text is pixel i of an `image_size x image_size` image (row `i // image_size`, column
`i % image_size`), so an image holds `image_size**2` tokens (4096 at 64 x 64). A token id is written in base
`levels` over the three channels with the high digit first: channel 0 = `id // levels**2`, channel 1 =
`(id // levels) % levels`, channel 2 = `id % levels`, each divided by `levels - 1`, so images are in [0, 1].
`levels=256` (the default) is upstream's layout, the one its checkpoints expect (base 256, high byte first: upstream
builds BGR arrays with OpenCV).

Fewer levels (our addition) spread a small vocabulary over the colour cube: a byte-level tokenizer (257 ids) fits
`levels=7`, whose neighbouring colours are 255/6 = 42.5 steps of 8 bits apart instead of 1. Decoding then tolerates
errors of 21 steps instead of half a step, and the model can tell the ids of its condition image apart from its
first layer on. `levels_for_vocabulary` gives the smallest layout that holds a tokenizer.

Encoding (as upstream trains): the text's ids, then EOS if it fits, then the pad token's colour (white when the
tokenizer has none) in every remaining pixel; the pixel mask is 1 on text and EOS. Sequences longer than the
capacity raise, or with `truncate=True` keep `capacity - 1` ids and end with EOS (upstream's truncation).

Decoding (ours; upstream's decoder truncates instead of rounding, lets negative values wrap around and never stops
at EOS): each channel is clamped to [0, 1] and rounded to the nearest of its `levels` values; reading stops at the first
EOS pixel; pad-coloured pixels and ids outside the vocabulary are padding and skipped. With `snap=True` a colour that
is not a vocabulary id, EOS or pad is first moved to the nearest one of those (Euclidean distance in RGB).
"""

from __future__ import annotations

import torch

__all__ = ["TextPixelCodec", "levels_for_vocabulary"]


def levels_for_vocabulary(vocab_size: int, eos_token_id: int | None = None, pad_token_id: int | None = None) -> int:
    """The fewest levels per channel whose `levels**3` colours hold every id, EOS, the pad colour and (without a pad
    token) white for padding."""
    largest = max([vocab_size - 1] + [i for i in (eos_token_id, pad_token_id) if i is not None])
    needed = largest + 1 + (pad_token_id is None)
    levels = 2
    while levels**3 < needed:
        levels += 1
    if levels > 256:
        raise ValueError(f"ids up to {largest} need more than three 8-bit channels.")
    return levels


class TextPixelCodec:
    """Writes token ids into images and reads them back (see the module docstring).

    Args:
        vocab_size: ids `0 .. vocab_size - 1` are text tokens (upstream uses `tokenizer.vocab_size`, the base
            vocabulary without added special tokens).
        eos_token_id: the id that ends a text (appended on encoding, stops decoding), or None.
        pad_token_id: the id whose colour fills unused pixels, or None for white.
        image_size: side of the image; the capacity is `image_size**2` tokens.
        levels: values per channel, 2..256; 256 is upstream's layout (see the module docstring).
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        image_size: int = 64,
        levels: int = 256,
    ):
        for name, value in (("vocab_size", vocab_size), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
            raise ValueError(f"levels must be an integer in [2, 256]; got {levels!r}.")
        white = levels**3 - 1
        if vocab_size > white:
            raise ValueError(
                f"vocab_size must be at most {white} (three channels of {levels} levels); got {vocab_size}."
            )
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= white):
                raise ValueError(f"{name} must be None or an integer in [0, {white}]; got {value!r}.")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.levels = levels
        self.capacity = image_size * image_size
        self._white = white
        self._pad_id = white if pad_token_id is None else pad_token_id

    @classmethod
    def from_tokenizer(cls, tokenizer, image_size: int = 64, levels: int = 256) -> "TextPixelCodec":
        """The codec of a transformers tokenizer: its base `vocab_size`, `eos_token_id` and `pad_token_id`."""
        return cls(tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, image_size, levels)

    # ----------------------------------------------------------------------------------------------- colours

    def ids_to_colors(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., ) integer ids -> (..., 3) colours in [0, 1], high digit first."""
        ids, base = ids.long(), self.levels
        digits = torch.stack([ids // base**2, (ids // base) % base, ids % base], dim=-1)
        return digits.float() / (base - 1)

    def colors_to_ids(self, colors: torch.Tensor) -> torch.Tensor:
        """(..., 3) colours -> (..., ) ids, each channel clamped to [0, 1] and rounded to the nearest level."""
        return self._digits_to_ids(self._digits(colors))

    def _digits(self, colors: torch.Tensor) -> torch.Tensor:
        """(..., 3) colours -> (..., 3) base-`levels` digits (float), clamped and rounded."""
        return torch.round(colors.float().clamp(0.0, 1.0) * (self.levels - 1))

    def _digits_to_ids(self, digits: torch.Tensor) -> torch.Tensor:
        base, digits = self.levels, digits.long()
        return digits[..., 0] * base**2 + digits[..., 1] * base + digits[..., 2]

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
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= self._white for i in ids):
                raise ValueError(f"token ids must be integers in [0, {self._white}].")
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
        base = self.levels
        digits = self._digits(colors)
        ids = self._digits_to_ids(digits)
        top = self.vocab_size - 1
        t0, t1, t2 = top // base**2, (top // base) % base, top % base
        d0, d1, d2 = digits.unbind(-1)
        # EOS and pad first, so that they win ties (argmin keeps the first minimum).
        candidates = [
            (self.ids_to_colors(torch.tensor(special)) * (base - 1)).round().expand_as(digits)
            for special in self._specials()
        ]
        if t0 > 0:  # every colour with a smaller high digit is in the vocabulary
            candidates.append(torch.stack([d0.clamp(max=t0 - 1), d1, d2], -1))
        if t1 > 0:
            candidates.append(torch.stack([torch.full_like(d0, t0), d1.clamp(max=t1 - 1), d2], -1))
        candidates.append(torch.stack([torch.full_like(d0, t0), torch.full_like(d1, t1), d2.clamp(max=t2)], -1))
        stacked = torch.stack(candidates)  # (K, ..., 3)
        best = ((stacked - digits[None]) ** 2).sum(-1).argmin(0)
        nearest = torch.gather(stacked, 0, best[None, ..., None].expand(1, *digits.shape)).squeeze(0)
        return torch.where(ids < self.vocab_size, ids, self._digits_to_ids(nearest))

    def decode(self, images: torch.Tensor, snap: bool = False) -> list[list[int]]:
        """(B, 3, S, S) or (3, S, S) images -> one list of text token ids per image (EOS and padding removed)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (B, 3, {self.image_size}, {self.image_size}); got {tuple(images.shape)}."
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images hold NaN or inf values; there is no token colour to read from them.")
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
