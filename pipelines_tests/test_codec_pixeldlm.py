"""TextPixelCodec: exact round trips, upstream's colour layout, rounding/clamping, EOS, padding and snapping."""

import random

import pytest
import torch

from pixel_diffusers.pipelines.pixeldlm.codec import TextPixelCodec, levels_for_vocabulary
from pixel_diffusers.testing import make_tiny_tokenizer

# Qwen2.5's numbers (spec B.4): base vocabulary 151,643 ids, pad <|endoftext|> 151643, eos <|im_end|> 151645.
QWEN = dict(vocab_size=151643, eos_token_id=151645, pad_token_id=151643)


@pytest.mark.parametrize("image_size", [4, 8, 64])
def test_any_sequence_up_to_capacity_round_trips(image_size):
    codec = TextPixelCodec(image_size=image_size, **QWEN)
    rng = random.Random(image_size)
    lengths = {0, 1, codec.capacity - 1, codec.capacity} | {rng.randrange(codec.capacity + 1) for _ in range(20)}
    for length in sorted(lengths):
        ids = [rng.randrange(QWEN["vocab_size"]) for _ in range(length)]
        images, mask = codec.encode(ids)
        assert images.shape == (1, 3, image_size, image_size) and images.min() >= 0 and images.max() <= 1
        assert mask.sum().item() == min(length + 1, codec.capacity)
        assert codec.decode(images) == [ids]


def test_batch_round_trip_with_extreme_ids_and_noise_below_half_a_level():
    codec = TextPixelCodec(image_size=8, **QWEN)
    batch = [[0, 1, 255, 256, 65535, 65536, 151642], [], list(range(100, 163))]
    images, _ = codec.encode(batch)
    noise = (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.98 / 255)
    assert codec.decode(images + noise) == batch


def test_upstream_channel_layout_high_byte_first():
    codec = TextPixelCodec(image_size=4, **QWEN)
    images, mask = codec.encode([151642, 0])
    # 151642 = 2 * 65536 + 80 * 256 + 90: channel 0 holds the high byte (upstream's OpenCV "B"), channel 2 the low one.
    assert torch.equal(torch.round(images[0, :, 0, 0] * 255), torch.tensor([2.0, 80.0, 90.0]))
    assert torch.equal(torch.round(images[0, :, 0, 2] * 255), torch.tensor([2.0, 80.0, 93.0]))  # EOS 151645
    assert torch.equal(torch.round(images[0, :, 3, 3] * 255), torch.tensor([2.0, 80.0, 91.0]))  # pad 151643
    assert mask[0].flatten().tolist() == [1.0] * 3 + [0.0] * 13


def test_decode_rounds_clamps_and_stops_at_eos():
    codec = TextPixelCodec(image_size=4, **QWEN)
    images, _ = codec.encode([7, 8, 9])
    images[0, :, 1, 3] = codec.ids_to_colors(torch.tensor(11))  # pixel 7, after the EOS at pixel 3: ignored
    # Negative values clamp to level 0 (upstream's uint8 cast wraps them to 255); 8.6 rounds to 9 (upstream: 8).
    images[0, :, 0, 1] = torch.tensor([-0.3, -1.0, 8.6 / 255])
    assert codec.decode(images) == [[7, 9, 9]]
    images[0, :, 0, 1] = torch.tensor([0.0, 0.0, 8.4 / 255])
    assert codec.decode(images) == [[7, 8, 9]]


def test_white_padding_without_pad_token_and_off_vocab_ids_are_skipped():
    codec = TextPixelCodec(vocab_size=1000, eos_token_id=None, pad_token_id=None, image_size=4)
    images, mask = codec.encode([5, 6])
    assert torch.all(images[0, :, 3, 3] == 1.0) and mask.sum() == 2
    images[0, :, 1, 0] = codec.ids_to_colors(torch.tensor(5000))  # off-vocabulary colour between text and padding
    assert codec.decode(images) == [[5, 6]]


def test_snap_finds_the_nearest_valid_colour_by_brute_force():
    codec = TextPixelCodec(image_size=4, **QWEN)
    valid = torch.cat([torch.arange(QWEN["vocab_size"]), torch.tensor([151643, 151645])])
    palette = codec.ids_to_colors(valid) * 255
    levels = torch.randint(0, 256, (64, 3), generator=torch.Generator().manual_seed(0)).float()
    levels[:, 0] = torch.randint(2, 256, (64,), generator=torch.Generator().manual_seed(1)).float()  # mostly off-vocab
    snapped = codec.snap(levels / 255)
    distance = ((codec.ids_to_colors(snapped) * 255 - levels) ** 2).sum(-1)
    nearest = torch.cdist(levels, palette).pow(2).min(dim=1).values
    assert torch.allclose(distance, nearest, atol=1e-3)
    # On-vocabulary colours are kept; EOS wins a tie against the text id one level away in the high byte.
    assert codec.snap(torch.tensor([[0.0, 3.0, 4.0]]) / 255).tolist() == [3 * 256 + 4]
    assert codec.snap(torch.tensor([[2.0, 80.0, 94.0]]) / 255).tolist() == [151645]


def test_snap_repairs_a_colour_that_drifted_off_vocabulary():
    codec = TextPixelCodec(image_size=4, **QWEN)
    images, _ = codec.encode([151642, 151642])
    images[0, 0, 0, 1] += 1.0 / 255  # high byte 3: no such token
    assert codec.decode(images) == [[151642]]
    assert codec.decode(images, snap=True) == [[151642, 151642]]


def test_truncation_and_errors():
    codec = TextPixelCodec(image_size=2, **QWEN)
    with pytest.raises(ValueError, match="capacity 4"):
        codec.encode([1, 2, 3, 4, 5])
    images, mask = codec.encode([1, 2, 3, 4, 5], truncate=True)
    assert codec.decode(images) == [[1, 2, 3]] and mask.sum() == 4
    with pytest.raises(ValueError, match="token ids"):
        codec.encode([-1])
    with pytest.raises(ValueError, match="vocab_size"):
        TextPixelCodec(vocab_size=0)
    with pytest.raises(ValueError, match="images must have shape"):
        codec.decode(torch.zeros(1, 3, 3, 3))


def test_text_round_trip_with_a_tokenizer():
    tokenizer = make_tiny_tokenizer()
    codec = TextPixelCodec.from_tokenizer(tokenizer, image_size=8)
    texts = ["hello world", "pixels ✓", ""]
    images, _ = codec.encode_text(tokenizer, texts)
    assert codec.decode_text(tokenizer, images) == texts


def test_fewer_levels_spread_a_small_vocabulary_and_tolerate_large_errors():
    tokenizer = make_tiny_tokenizer()  # 257 ids, EOS = pad = 256
    levels = levels_for_vocabulary(tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert levels == 7  # 6**3 = 216 < 257 <= 343 = 7**3
    codec = TextPixelCodec.from_tokenizer(tokenizer, image_size=8, levels=levels)
    images, _ = codec.encode_text(tokenizer, ["12+30=", "42"])
    # id 50 in base 7 is (1, 0, 1): every channel value is a multiple of 1/6.
    assert torch.allclose(codec.ids_to_colors(torch.tensor(50)), torch.tensor([1.0, 0.0, 1.0]) / 6)
    assert torch.allclose(images * 6, torch.round(images * 6), atol=1e-6)
    noise = (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.98 / 6)
    assert codec.decode_text(tokenizer, images + noise) == ["12+30=", "42"]
    ids = list(range(tokenizer.vocab_size))[:64]
    assert codec.decode(codec.encode(ids)[0]) == [ids]


def test_levels_256_is_upstreams_layout_and_levels_are_validated():
    upstream, explicit = TextPixelCodec(image_size=4, **QWEN), TextPixelCodec(image_size=4, levels=256, **QWEN)
    ids = torch.tensor([0, 255, 256, 65536, 151642])
    assert torch.equal(upstream.ids_to_colors(ids), explicit.ids_to_colors(ids))
    assert levels_for_vocabulary(**QWEN) == 54  # 53**3 = 148,877 < 151,646 <= 54**3
    with pytest.raises(ValueError, match="levels"):
        TextPixelCodec(vocab_size=10, levels=1)
    with pytest.raises(ValueError, match="vocab_size must be at most 7"):
        TextPixelCodec(vocab_size=8, levels=2)  # 2**3 colours: 7 ids and white padding at most
    with pytest.raises(ValueError, match="eos_token_id"):
        TextPixelCodec(vocab_size=5, eos_token_id=8, levels=2)


def test_snap_with_few_levels_finds_the_nearest_valid_colour_by_brute_force():
    codec = TextPixelCodec(vocab_size=200, eos_token_id=250, pad_token_id=None, image_size=4, levels=7)
    valid = torch.tensor(list(range(200)) + [250, 342])
    palette = codec.ids_to_colors(valid) * 6
    digits = torch.randint(0, 7, (256, 3), generator=torch.Generator().manual_seed(0)).float()
    snapped = codec.snap(digits / 6)
    distance = ((codec.ids_to_colors(snapped) * 6 - digits) ** 2).sum(-1)
    assert torch.allclose(distance, torch.cdist(digits, palette).pow(2).min(dim=1).values, atol=1e-4)
    assert set(snapped.tolist()) <= set(valid.tolist())
