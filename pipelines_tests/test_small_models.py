"""Small models, toy data, the ideal denoiser and the small pipeline (smalldiffusion in diffusers form)."""

import math

import pytest
import torch

from pixel_diffusers.models.analytic import OptimalDenoiser
from pixel_diffusers.models.small import ConditionalMLP, IdealDenoiser, SmallDiT, SmallUNet, Swissroll, TimeInputMLP, TreeDataset
from pixel_diffusers.pipelines.small import SmallDiffusionPipeline
from pixel_diffusers.schedulers.scheduling_gradient_estimation import GradientEstimationScheduler

MODIFIERS = [dict(), dict(scaled=True), dict(prediction_type="x0"), dict(prediction_type="v"),
             dict(scaled=True, prediction_type="x0"), dict(scaled=True, prediction_type="v"), dict(prediction_type="flow")]


def test_unet_cifar_setting_is_the_ddpm_size():
    assert sum(p.numel() for p in SmallUNet().parameters()) == 36_071_939  # smalldiffusion Unet(32, 3, 3)


@pytest.mark.parametrize("modifiers", MODIFIERS)
@pytest.mark.parametrize("conditional", [False, True])
def test_image_models_shapes_cfg_and_loss(modifiers, conditional):
    kwargs = dict(num_classes=5) if conditional else {}
    models = [SmallDiT(8, 1, 2, depth=1, head_dim=8, num_heads=2, **modifiers, **kwargs),
              SmallUNet(8, 1, 1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), num_res_blocks=1, **modifiers, **kwargs)]
    for model in models:
        for batch in (1, 3):
            x = torch.randn(batch, 1, 8, 8)
            cond = torch.arange(batch) % 5 if conditional else None
            for sigma in (torch.tensor(0.7), torch.rand(batch, 1, 1, 1) + 0.1):
                assert model.predict_eps(x, sigma, cond).shape == x.shape
            if conditional:
                assert model.predict_eps_cfg(x, torch.tensor(0.7), cond, 4.0).shape == x.shape
            model.get_loss(x, torch.rand(batch, 1, 1, 1) + 0.1, torch.randn_like(x), cond).backward()


def test_prediction_types_convert_to_the_same_epsilon():
    """An x0 / v network that outputs the target of a known epsilon gives that epsilon back."""
    x0, eps, sigma = torch.randn(4, 2), torch.randn(4, 2), torch.tensor(0.8)
    x = x0 + sigma * eps
    alpha = 1 / (1 + sigma**2)
    targets = {"epsilon": eps, "x0": x0, "v": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0}
    for kind, target in targets.items():
        model = TimeInputMLP(prediction_type=kind)
        model._network = lambda *args, target=target: target
        torch.testing.assert_close(model.predict_eps(x, sigma), eps, atol=1e-5, rtol=1e-5)
        model.get_loss(x0, sigma, eps)  # the loss of the exact target is 0
        assert model.get_loss(x0, sigma, eps).item() < 1e-12


def test_scaled_feeds_unit_variance_input():
    seen = []
    model = TimeInputMLP(scaled=True)
    model._network = lambda x, sigma, cond: seen.append(x) or x
    model(torch.full((1, 2), 5.0), torch.tensor(2.0))
    torch.testing.assert_close(seen[0], torch.full((1, 2), 5.0 / math.sqrt(5.0)))


def test_label_dropout_only_in_training():
    model = ConditionalMLP(num_classes=3, dropout_prob=0.5)
    labels = torch.zeros(2000, dtype=torch.long)
    model.train()
    torch.manual_seed(0)
    dropped = model.cond_embed.embedding.weight[3]
    out = model.cond_embed.embedding(torch.where(torch.rand(2000) < 0.5, 3, labels))
    assert (out == dropped).all(1).float().mean().item() == pytest.approx(0.5, abs=0.05)
    model.eval()
    assert torch.equal(model.cond_embed(labels[:3]), model.cond_embed.mlp(model.cond_embed.embedding(labels[:3])))
    with pytest.raises(ValueError, match="cond"):
        model(torch.zeros(1, 2), torch.tensor(1.0))


def test_ideal_denoiser_equals_optimal_analytic_denoiser():
    data = torch.rand(30, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ideal = IdealDenoiser().fit(data)
    optimal = OptimalDenoiser(sample_size=2).fit(data)
    for t in (20, 300, 800):
        a = optimal.alphas_cumprod[t]
        sigma = ((1 - a) / a).sqrt()
        x_sigma = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(t))
        x0 = optimal(a.sqrt() * x_sigma, t)
        torch.testing.assert_close(ideal.predict_eps(x_sigma, sigma), (x_sigma - x0) / sigma, atol=1e-4, rtol=1e-4)
    sigmas = torch.tensor([0.1, 1.0, 3.0, 10.0]).view(4, 1, 1, 1)
    x = torch.randn(4, 3, 2, 2)
    batched = ideal.predict_eps(x, sigmas)
    single = torch.cat([ideal.predict_eps(x[i : i + 1], sigmas[i].reshape(())) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)


def test_toy_datasets():
    roll = Swissroll(math.pi / 2, 5 * math.pi, 100)
    assert len(roll) == 100 and len(torch.unique(roll.vals, dim=0)) == 100
    assert roll.distance_to_curve(roll.vals).max() < 1e-3
    tree = TreeDataset(branching_factor=4, depth=3, num_samples_per_path=30)
    assert len(tree) == 64 * 30 and tree.num_leaves == 64
    point, label = tree[30 * 5 + 29]
    assert label == 5 and torch.linalg.norm(point).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(tree[0][0], torch.zeros(2))


def test_tree_on_leaf_measure():
    tree = TreeDataset()
    assert tree.on_leaf(tree.points, tree.labels).all()
    assert tree.leaf_spacing == pytest.approx(torch.linalg.norm(tree.paths[0][-1] - tree.paths[1][-1]).item(), rel=1e-6)
    # a point on the first-level trunk of leaves 0..15 is on each of them, and on no other leaf
    trunk = (tree.paths[0][0] + tree.paths[0][1]) / 2
    assert tree.on_leaf(trunk.expand(64, 2), torch.arange(64)).nonzero()[:, 0].tolist() == list(range(16))
    # on leaf 1's last segment, 0.03 from leaf 0's path: on leaf 1 only (the old "within 0.04" counted it for leaf 0)
    node, tip1 = tree.paths[1][-2], tree.paths[1][-1]
    point = (node + 0.3 * (tip1 - node))[None]
    assert tree.distance_to_path(point, torch.tensor([0])).item() < 0.04
    assert not tree.on_leaf(point, torch.tensor([0])).item() and tree.on_leaf(point, torch.tensor([1])).item()
    # the nearest path, but farther than half the leaf spacing from it
    outside = tip1 * (1 + tree.leaf_spacing)
    assert not tree.on_leaf(outside[None], torch.tensor([1])).item()
    assert tree.on_leaf(outside[None], torch.tensor([1]), tolerance=2 * tree.leaf_spacing).item()


def test_small_pipeline_with_ideal_denoiser_lands_on_training_points(tmp_path):
    roll = Swissroll(math.pi / 2, 5 * math.pi, 50)
    pipe = SmallDiffusionPipeline(IdealDenoiser().fit(roll), GradientEstimationScheduler(schedule="log_linear", gam=2.0))
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=16, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images
    assert torch.cdist(samples, roll.vals).min(1).values.max() < 0.05
    pipe.save_pretrained(tmp_path)
    loaded = SmallDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(batch_size=16, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(again, samples)


def test_small_pipeline_conditional_and_bad_inputs():
    pipe = SmallDiffusionPipeline(ConditionalMLP(num_classes=4).eval(), GradientEstimationScheduler(schedule="log_linear"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3, num_inference_steps=4, class_labels=[0, 1, 2], guidance_scale=2.0).images
    assert out.shape == (3, 2)
    for kwargs, name in [({"batch_size": 3}, "class_labels"), ({"batch_size": 2, "class_labels": [0, 1, 2]}, "class_labels"),
                         ({"batch_size": 0}, "batch_size"), ({"batch_size": 3, "class_labels": [0, 1, 2], "output_type": "pil"}, "output_type")]:
        with pytest.raises(ValueError, match=name):
            pipe(**kwargs)


def test_train_small_swissroll_learns_and_resumes(tmp_path):
    from repo_scripts import load_script

    train_small = load_script("train_small")
    argv = ["--data", "swissroll", "--batch_size", "100", "--checkpointing_steps", "100", "--lr_scheduler", "cosine",
            "--output_dir", str(tmp_path), "--report_to", "none"]
    train_small.main(argv + ["--max_train_steps", "100"])
    train_small.main(argv + ["--max_train_steps", "200", "--resume_from_checkpoint", "latest"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*"))[-1].endswith("200")
    pipe = SmallDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    roll = Swissroll(math.pi / 2, 5 * math.pi, 100)
    args = train_small.parse_args(argv + ["--num_inference_steps", "10"])
    trained = train_small.evaluate(pipe, roll, args, num_samples=500)["mean_distance_to_spiral"]
    untrained = SmallDiffusionPipeline(TimeInputMLP(hidden_dims=(16, 128, 128, 128, 128, 16)), pipe.scheduler)
    assert trained < 0.8 * train_small.evaluate(untrained, roll, args, num_samples=500)["mean_distance_to_spiral"]
