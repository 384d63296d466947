"""pixel_diffusers.training_utils: buckets, sampler, data sources, losses, optimisation helpers and checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_diffusers.training_utils import (
    AdaptiveGradClip,
    AspectRatioBuckets,
    BucketBatchSampler,
    BucketedImageDataset,
    CheckpointManager,
    DINOv3Features,
    FrequencyLoss,
    ImageCaptionFolder,
    IndexBatches,
    LossSpikeGuard,
    REPALoss,
    StreamingBucketBatches,
    build_lr_scheduler,
    build_optimizer,
    collate,
    load_image_caption_dataset,
    run_with_oom_retry,
    sample_flow_sigmas,
    shapes,
)


# ---------------------------------------------------------------------------------------------------------------------
# Buckets and sampler
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_size, count", [(1024, 123), (512, 27)])
def test_bucket_counts_match_the_spec(max_size, count):
    buckets = AspectRatioBuckets(256, max_size)
    assert len(buckets) == count
    for height, width in buckets.sizes:
        assert height % 16 == 0 and width % 16 == 0
        assert 256 <= min(height, width) and max(height, width) <= max_size
        assert 0.5 - 1e-9 <= width / height <= 2.0 + 1e-9


def test_bucket_assignment_never_upscales_and_follows_the_aspect():
    buckets = AspectRatioBuckets(256, 1024)
    for height, width in [(1080, 1920), (1920, 1080), (700, 700), (400, 800), (2000, 2000)]:
        bh, bw = buckets.sizes[buckets.assign(height, width)]
        assert bh * bw <= height * width
        assert abs(math.log(bw / bh) - math.log(width / height)) < 0.25
    assert buckets.sizes[buckets.assign(1080, 1920)] == (576, 1024)
    assert buckets.sizes[buckets.assign(100, 100)] == (256, 256)  # smaller than every bucket: the smallest
    with pytest.raises(ValueError, match="max_size"):
        AspectRatioBuckets(512, 256)


def _bucket_ids(count=40):
    return [i % 3 if i % 7 else None for i in range(count)]


def test_sampler_batches_come_from_one_bucket_and_shard_disjointly():
    ids = _bucket_ids()
    ranks = [BucketBatchSampler(ids, 3, seed=1, num_replicas=2, rank=r) for r in range(2)]
    seen = []
    for sampler in ranks:
        iterator = iter(sampler)
        batches = [next(iterator) for _ in range(len(sampler))]
        for batch in batches:
            assert len(batch) == 3 and len({ids[i] for i, _ in batch}) == 1
            assert all(epoch == 0 for _, epoch in batch)
        seen += [i for batch in batches for i, _ in batch]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert len(seen) == len(set(seen))  # no item twice in one epoch, across processes
    assert None not in [ids[i] for i in seen]


def test_sampler_resumes_with_exactly_the_next_batch():
    ids = _bucket_ids()
    sampler = BucketBatchSampler(ids, 2, seed=3)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(len(sampler) + 3)]  # crosses an epoch boundary
    reference = [next(iterator) for _ in range(5)]
    probe = BucketBatchSampler(ids, 2, seed=3)
    probe_iterator = iter(probe)
    for _ in range(len(first)):
        next(probe_iterator)
    restored = BucketBatchSampler(ids, 2, seed=3)
    restored.load_state_dict(probe.state_dict())
    resumed = iter(restored)
    assert [next(resumed) for _ in range(5)] == reference
    # Another epoch reshuffles; another seed gives another order.
    assert first[: len(sampler)] != first[len(sampler) : 2 * len(sampler)]
    other = iter(BucketBatchSampler(ids, 2, seed=4))
    assert [next(other) for _ in range(4)] != first[:4]
    with pytest.raises(ValueError, match="seed"):
        restored.load_state_dict({"epoch": 0, "batches_done": 0, "seed": 9})


@pytest.mark.parametrize("num_items, batch_size, replicas", [(10, 3, 1), (7, 4, 2), (3, 8, 2), (5, 5, 3)])
def test_index_batches_deal_each_epochs_permutation_round_robin_and_resume(num_items, batch_size, replicas):
    steps = 5
    streams = [IndexBatches(num_items, batch_size, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    drawn = [[stream.next() for _ in range(steps)] for stream in streams]
    epochs = range(-(-steps * batch_size * replicas // num_items))  # (3, 8, 2): one batch spans several epochs
    order = [int(i) for e in epochs for i in torch.randperm(num_items, generator=torch.Generator().manual_seed(3 * 7919 + e))]
    for rank, batches in enumerate(drawn):
        assert [i for batch in batches for i in batch] == order[rank::replicas][: steps * batch_size]
        assert all(type(i) is int for batch in batches for i in batch)
    resumed = IndexBatches(num_items, batch_size, seed=3, num_replicas=replicas, rank=replicas - 1)
    resumed.load_state_dict(json.loads(json.dumps(streams[-1].state_dict())))
    assert resumed.state_dict() == {"position": steps * batch_size}
    assert [resumed.next() for _ in range(3)] == [streams[-1].next() for _ in range(3)]


# ---------------------------------------------------------------------------------------------------------------------
# Data sources: a folder with corrupt files, an imagefolder dataset, streaming
# ---------------------------------------------------------------------------------------------------------------------
def _write_folder(root, count=6):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape, color, background = shapes.training_combinations()[i]
        image = shapes.render_shape(shape, color, background, 32 + 16 * (i % 2), np.random.default_rng(i))
        sub = root / ("nested" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img{i}.png")
        if i != 0:
            (sub / f"img{i}.txt").write_text(shapes.caption(shape, color, background))
    (root / "not_an_image.png").write_text("plain text")
    truncated = root / "truncated.png"
    Image.new("RGB", (32, 32), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    return root


def test_folder_source_skips_and_counts_unreadable_files(tmp_path):
    folder = ImageCaptionFolder(_write_folder(tmp_path / "data"))
    assert len(folder) == 8
    dataset = BucketedImageDataset(folder, AspectRatioBuckets(32, 48, 16), seed=0, caption_dropout=0.0)
    assert dataset.num_unreadable >= 1  # the text file cannot even be opened
    sampler = BucketBatchSampler(dataset.bucket_ids, 1, seed=0)
    iterator = iter(sampler)
    batches = [collate([dataset[key] for key in next(iterator)]) for _ in range(len(sampler))]
    readable = [b for b in batches if b["pixel_values"] is not None]
    skipped = dataset.num_unreadable + sum(b["num_skipped"] for b in batches)
    assert len(readable) == 6 and skipped == 2
    captions = {c for b in readable for c in b["captions"]}
    assert "" in captions  # img0 has no caption file
    assert "a red circle on a blue background" in captions
    for batch in readable:
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    with pytest.raises(ValueError, match="train_data_dir"):
        ImageCaptionFolder(tmp_path / "missing")


def test_items_are_reproducible_and_caption_dropout_applies(tmp_path):
    source = shapes.ShapesDataset(64, size=32, seed=0)
    dataset = BucketedImageDataset(source, AspectRatioBuckets(32, 32, 8), seed=0, caption_dropout=0.5)
    first, again = dataset[(5, 0)], dataset[(5, 0)]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["caption"] == again["caption"]
    dropped = sum(dataset[(i, 0)]["caption"] == "" for i in range(64))
    assert 16 <= dropped <= 48


def _write_imagefolder(root, count=8):
    root.mkdir(parents=True)
    rows = []
    for i in range(count):
        shape, color, background = shapes.training_combinations()[i]
        shapes.render_shape(shape, color, background, 32, np.random.default_rng(i)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": shapes.caption(shape, color, background)})
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "broken"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_imagefolder_dataset_with_metadata(tmp_path):
    source = load_image_caption_dataset(str(_write_imagefolder(tmp_path / "hf")), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 9
    dataset = BucketedImageDataset(source, AspectRatioBuckets(32, 32, 16), caption_dropout=0.0)
    assert dataset.num_unreadable == 1
    captions = {dataset[(i, 0)]["caption"] for i, b in enumerate(dataset.bucket_ids) if b is not None}
    assert "a red circle on a green background" in captions
    with pytest.raises(ValueError, match="caption_column"):
        load_image_caption_dataset(str(tmp_path / "hf"), caption_column="prompt", cache_dir=str(tmp_path / "cache"))


def test_streaming_batches_are_sharded_skip_corrupt_rows_and_resume(tmp_path):
    root = _write_imagefolder(tmp_path / "hf", count=16)
    stream = load_image_caption_dataset(str(root), streaming=True)
    buckets = AspectRatioBuckets(32, 32, 16)
    per_rank = []
    for rank in range(2):
        batches = StreamingBucketBatches(stream, buckets, 2, seed=0, num_replicas=2, rank=rank, caption_dropout=0.0)
        iterator = iter(batches)
        per_rank.append([next(iterator)["captions"] for _ in range(2)])
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))
    full = StreamingBucketBatches(stream, buckets, 2, seed=0, caption_dropout=0.0)
    iterator = iter(full)
    reference = [next(iterator) for _ in range(10)]  # 16 readable rows: 8 batches per epoch
    assert full.num_skipped >= 1
    resumed = StreamingBucketBatches(stream, buckets, 2, seed=0, caption_dropout=0.0)
    resumed.load_state_dict({"epoch": 1, "batches_done": 0, "rows_done": 0, "waiting": [], "seed": 0})
    again = iter(resumed)
    for expected in reference[8:10]:
        batch = next(again)
        assert batch["captions"] == expected["captions"]
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def test_sampled_sigmas_stay_inside_t_eps():
    sigmas = sample_flow_sigmas(4096, torch.Generator().manual_seed(0))
    assert sigmas.min() >= 0.05 and sigmas.max() <= 0.95
    assert abs(sigmas.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric
    again = sample_flow_sigmas(4096, torch.Generator().manual_seed(0))
    assert torch.equal(sigmas, again)
    with pytest.raises(ValueError, match="weighting_scheme"):
        sample_flow_sigmas(2, scheme="beta")


def test_frequency_loss_weights_and_values():
    loss = FrequencyLoss(quality=90)
    luma, chroma = loss.coefficient_weights[0], loss.coefficient_weights[1]
    assert luma[0, 0].item() == pytest.approx(2.18, abs=0.01) and luma[7, 7].item() == pytest.approx(0.33, abs=0.01)
    assert chroma[0, 0].item() == pytest.approx(4.35, abs=0.01) and chroma[7, 7].item() == pytest.approx(0.65, abs=0.01)
    x = torch.randn(2, 3, 16, 24)
    assert loss(x, x).item() == 0.0
    # The DCT is orthonormal: with uniform weights the loss is the MSE of the YCbCr difference.
    loss.coefficient_weights.fill_(1.0)
    y = torch.randn_like(x)
    ycbcr = torch.einsum("oc,bchw->bohw", loss.rgb_to_ycbcr, x - y)
    assert loss(x, y).item() == pytest.approx(ycbcr.square().mean().item(), rel=1e-5)
    # A low-frequency error weighs more than a high-frequency one of the same energy.
    weighted = FrequencyLoss(quality=90)
    base = torch.zeros(1, 3, 8, 8)
    flat = torch.ones(1, 3, 8, 8) * 0.1
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 0.2 - 0.1
    assert weighted(flat, base) > weighted(checker.expand(1, 3, 8, 8), base)
    with pytest.raises(ValueError, match="divisible by 8"):
        weighted(torch.zeros(1, 3, 12, 12), torch.zeros(1, 3, 12, 12))


def make_tiny_dinov3(num_register_tokens=4):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
        num_register_tokens=num_register_tokens, image_size=32,
    )
    return DINOv3ViTModel(config).eval()


def test_dinov3_features_drop_cls_and_register_tokens():
    features = DINOv3Features(make_tiny_dinov3(4))
    tokens, grid = features(torch.rand(2, 3, 32, 48) * 2 - 1)
    assert grid == (4, 6) and tokens.shape == (2, 24, 32)
    raw = features.model(pixel_values=torch.zeros(1, 3, 32, 48)).last_hidden_state
    assert raw.shape[1] == 24 + 1 + 4


def test_repa_loss_trains_its_projector_and_resizes_grids():
    repa = REPALoss(hidden_size=16, feature_dim=32)
    hidden = torch.randn(2, 16, 16, requires_grad=True)
    features = torch.randn(2, 16, 32)
    loss = repa(hidden, (4, 4), features, (4, 4))
    assert 0 < loss.item() < 1.0
    loss.backward()
    assert repa.projector.weight.grad.abs().sum() > 0 and hidden.grad.abs().sum() > 0
    resized = repa(torch.randn(2, 4, 16), (2, 2), features, (4, 4))
    assert resized.shape == ()
    # Aligned features give the minimum: a projector that reproduces the normalised target scores ~0.
    target = (features - features.mean(1, keepdim=True)) / (features.std(1, keepdim=True) + 1e-6)
    assert 0.5 * (1 - torch.nn.functional.cosine_similarity(target, target, dim=-1)).mean() < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------------------------------
def test_optimizer_groups_weight_decay_and_frozen_prefixes():
    model = torch.nn.ModuleDict(
        {"proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4), "body": torch.nn.Linear(4, 2)}
    )
    named = list(model.named_parameters())
    optimizer = build_optimizer(
        named, learning_rate=1e-3, weight_decay=0.1, learning_rate_by_prefix={"body.": 0.0, "norm.": 5e-4}
    )
    groups = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in optimizer.param_groups}
    assert groups == {(1e-3, 0.1): 1, (1e-3, 0.0): 1, (5e-4, 0.0): 2}  # proj weight | proj bias | norm weight, bias
    assert not model["body"].weight.requires_grad
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(named, name="sgd")


def test_stepped_cosine_restart_schedule():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-4)
    scheduler = build_lr_scheduler("stepped_cosine_restart", optimizer, 0, 100, steps_per_cycle=10)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4) and rates[10] == pytest.approx(0.9e-4) and rates[20] == pytest.approx(0.81e-4)
    assert min(rates[:10]) > 0.5e-4 and rates[9] == pytest.approx(0.5e-4 + 0.5e-4 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_lr_scheduler("exponential", optimizer, 0, 10)


class _NoAccelerator:
    @staticmethod
    def clip_grad_norm_(parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def test_adaptive_grad_clip_caps_spikes_to_the_running_statistics():
    clipper = AdaptiveGradClip(max_norm=100.0, z_threshold=2.5, warmup_steps=5)
    parameter = torch.nn.Parameter(torch.zeros(1))
    for norm in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0]:
        parameter.grad = torch.tensor([norm])
        assert clipper.clip(_NoAccelerator, [parameter]) == pytest.approx(norm)
    mean, std = clipper.mean, math.sqrt(clipper.var)
    parameter.grad = torch.tensor([50.0])
    assert clipper.clip(_NoAccelerator, [parameter]) == pytest.approx(50.0)
    assert parameter.grad.item() == pytest.approx(mean + 2.5 * std, rel=1e-4)
    restored = AdaptiveGradClip()
    restored.load_state_dict(clipper.state_dict())
    assert restored.state_dict() == clipper.state_dict()


def test_loss_spike_guard_restores_the_snapshot():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    guard = LossSpikeGuard(model, optimizer, every=10, factor=5.0)
    guard.maybe_snapshot(0)
    saved = model.weight.detach().clone()
    assert not guard.is_spike(1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not guard.is_spike(4.0)
    assert guard.is_spike(25.0) and guard.num_rollbacks == 1
    assert torch.equal(model.weight, saved)
    assert guard.is_spike(float("nan"))


def test_oom_retry_halves_images_and_captions_together():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def step(batch):
        seen.append((len(batch["pixel_values"]), len(batch["captions"])))
        if len(batch["pixel_values"]) > 2:
            raise torch.OutOfMemoryError("simulated")
        return "done"

    batch = {"pixel_values": torch.zeros(8, 3, 4, 4), "captions": [str(i) for i in range(8)], "num_skipped": 0}
    assert run_with_oom_retry(step, batch, optimizer) == "done"
    assert seen == [(8, 8), (4, 4), (2, 2)]
    seen.clear()
    assert run_with_oom_retry(step, batch, optimizer, max_retries=1) is None
    assert seen == [(8, 8), (4, 4)]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    manager = CheckpointManager(tmp_path, total_limit=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(accelerator, step)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-2", "checkpoint-3"]

    def crash(output_dir, **kwargs):  # a run killed half-way through writing its next checkpoint
        (tmp_path / ".checkpoint-4.partial" / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, 4)
    monkeypatch.undo()
    assert manager.latest().name == "checkpoint-3"
    with torch.no_grad():
        model.weight.fill_(0)
    assert manager.resume(accelerator, "latest") == 3
    assert torch.all(model.weight == 3)
    manager.save(accelerator, 5)
    assert not list(tmp_path.glob(".checkpoint-*")) and manager.latest().name == "checkpoint-5"
    assert manager.resume(accelerator, None) == 0
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        manager.resume(accelerator, "checkpoint-99")
    AcceleratorState._reset_state(reset_partial_state=True)
