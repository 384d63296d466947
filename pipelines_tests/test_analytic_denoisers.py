"""Analytic denoisers: closed-form identities, fit/save/load, and the upstream-compatible options."""

import pytest
import torch

from pixel_diffusers.models.analytic import (
    NearestDatasetDenoiser,
    OptimalDenoiser,
    PCALocalityDenoiser,
    SmoothedCFDMDenoiser,
    WienerDenoiser,
)


def images(n, seed=0, channels=3, size=4):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def noisy(x0, model, t, seed=1):
    a = model.alphas_cumprod[t]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def reference_posterior_mean(x_t, data, a, temperature=1.0):
    distances = ((x_t.flatten(1)[:, None] - a.sqrt() * data.flatten(1)[None]) ** 2).sum(-1)
    weights = torch.softmax(-distances.double() / (2 * (1 - a.double()) * temperature), dim=1)
    return (weights @ data.flatten(1).double()).float().view(x_t.shape)


@pytest.mark.parametrize("t", [0, 50, 400, 999])
def test_optimal_streaming_is_the_exact_posterior_mean(t):
    data = images(37)
    model = OptimalDenoiser(sample_size=4, chunk_size=8).fit(data, batch_size=5)
    x_t = noisy(data[:3], model, t)
    torch.testing.assert_close(model(x_t, t), reference_posterior_mean(x_t, data, model.alphas_cumprod[t]), atol=2e-5, rtol=1e-4)


def test_optimal_at_low_noise_returns_training_images():
    data = images(20)
    model = OptimalDenoiser(sample_size=4).fit(data)
    torch.testing.assert_close(model(noisy(data[[3, 7, 11]], model, 0), 0), data[[3, 7, 11]], atol=1e-5, rtol=0)


def test_optimal_top_k_is_exact_with_all_neighbours_and_truncates_otherwise():
    data = images(30)
    exact = OptimalDenoiser(sample_size=4).fit(data)
    top_all = OptimalDenoiser(sample_size=4, num_neighbors=30, chunk_size=7).fit(data)
    top_3 = OptimalDenoiser(sample_size=4, num_neighbors=3, chunk_size=7).fit(data)
    x_t = noisy(data[:4], exact, 900)
    torch.testing.assert_close(top_all(x_t, 900), exact(x_t, 900), atol=1e-5, rtol=1e-4)
    # at high noise top-k is the mean of the k nearest, not the data mean
    assert (top_3(x_t, 900) - exact(x_t, 900)).abs().max() > 1e-2
    query = x_t.flatten(1) / exact.alphas_cumprod[900].sqrt()
    nearest = torch.cdist(query, data.flatten(1)).topk(3, largest=False).indices
    assert torch.equal(top_3._nearest(query, 3)[1].sort(1).values, nearest.sort(1).values)


def test_wiener_matches_optimal_on_a_large_gaussian_sample():
    generator = torch.Generator().manual_seed(2)
    n = 12
    factor = torch.randn(n, n, generator=generator) * 0.3
    mean = torch.randn(n, generator=generator) * 0.2
    data = (mean + torch.randn(60000, n, generator=generator) @ factor.T).view(-1, 3, 2, 2)
    held_out = (mean + torch.randn(16, n, generator=generator) @ factor.T).view(-1, 3, 2, 2)
    wiener = WienerDenoiser(sample_size=2).fit(data, batch_size=8192)
    optimal = OptimalDenoiser(sample_size=2, chunk_size=20000).fit(data)
    # (below t ~ 300 the empirical posterior starts to resolve individual training points: memorisation)
    for t in (300, 500, 700):
        x_t = noisy(held_out, wiener, t, seed=3)
        gap = (wiener(x_t, t) - optimal(x_t, t)).square().mean()
        error = (wiener(x_t, t) - held_out).square().mean()
        assert gap < 0.005 * error, (t, gap, error)
    torch.testing.assert_close(wiener.mean, data.flatten(1).mean(0), atol=1e-5, rtol=0)


def test_wiener_step_equals_upstream_filter_matrix():
    data = images(50, size=3)
    model = WienerDenoiser(sample_size=3).fit(data, batch_size=7)
    covariance = torch.cov(data.flatten(1).T.double())
    torch.testing.assert_close((model.eigenvectors * model.eigenvalues) @ model.eigenvectors.T, covariance.float(), atol=1e-5, rtol=1e-4)
    a = model.alphas_cumprod[500]
    x_t = noisy(data[:2], model, 500)
    upstream = (model.filter_matrix(a) @ (x_t.flatten(1) / a.sqrt() - model.mean).T).T + model.mean
    torch.testing.assert_close(model(x_t, 500).flatten(1), upstream, atol=1e-5, rtol=1e-4)


def test_pca_locality_with_all_ones_mask_equals_optimal():
    data = images(41)
    pca = PCALocalityDenoiser(sample_size=4, chunk_size=9).fit(data)
    optimal = OptimalDenoiser(sample_size=4).fit(data)
    a = pca.alphas_cumprod[300]
    x_t = noisy(data[:3], pca, 300).flatten(1)
    ones = torch.ones(pca.dim, pca.dim)
    torch.testing.assert_close(pca.predict_x0(x_t, a, mask=ones), optimal.predict_x0(x_t, a), atol=1e-5, rtol=1e-4)


def test_pca_locality_identity_mask_is_per_pixel_softmax_and_chunk_mean_is_upstream():
    data = images(20)
    pca = PCALocalityDenoiser(sample_size=4, chunk_size=20).fit(data)
    chunked = PCALocalityDenoiser(sample_size=4, chunk_size=5, streaming="chunk_mean").fit(data)
    a = pca.alphas_cumprod[600]
    x_t = noisy(data[:2], pca, 600).flatten(1)
    eye = torch.eye(pca.dim)
    logits = -(x_t[:, None] - a.sqrt() * data.flatten(1)[None]) ** 2 / (2 * (1 - a))
    per_pixel = (torch.softmax(logits, 1) * data.flatten(1)[None]).sum(1)
    torch.testing.assert_close(pca.predict_x0(x_t, a, mask=eye), per_pixel, atol=1e-5, rtol=1e-4)
    chunk_means = torch.stack([(torch.softmax(logits[:, i : i + 5], 1) * data.flatten(1)[None, i : i + 5]).sum(1) for i in range(0, 20, 5)])
    torch.testing.assert_close(chunked.predict_x0(x_t, a, mask=eye), chunk_means.mean(0), atol=1e-5, rtol=1e-4)


def test_pca_locality_sparse_mask_equals_dense_mask():
    data = images(30, size=6)
    pca = PCALocalityDenoiser(sample_size=6, mask_threshold=0.3, chunk_size=11).fit(data)
    a = pca.alphas_cumprod[200]
    dense = pca.locality_mask(a)
    assert 0 < dense.mean() < 0.25 and set(dense.unique().tolist()) <= {0.0, 1.0}
    x_t = noisy(data[:2], pca, 200)
    assert pca._cached_mask(a).layout == torch.sparse_csr
    torch.testing.assert_close(pca(x_t, 200).flatten(1), pca.predict_x0(x_t.flatten(1), a, mask=dense), atol=1e-5, rtol=1e-4)


def test_nearest_dataset_unscaled_and_scaled_rules():
    data = images(25)
    unscaled = NearestDatasetDenoiser(sample_size=4, chunk_size=6).fit(data)
    scaled = NearestDatasetDenoiser(sample_size=4, scaled=True).fit(data)
    x_t = noisy(data[:4], unscaled, 700)
    a = unscaled.alphas_cumprod[700]
    flat = data.flatten(1)
    torch.testing.assert_close(unscaled(x_t, 700), data[torch.cdist(x_t.flatten(1), flat).argmin(1)])
    torch.testing.assert_close(scaled(x_t, 700), data[torch.cdist(x_t.flatten(1), a.sqrt() * flat).argmin(1)])


def test_scfdm_averages_the_optimal_denoiser_over_perturbed_queries():
    data = images(15)
    model = SmoothedCFDMDenoiser(sample_size=4, num_noise=4, smoothing_std=0.3).fit(data)
    optimal = OptimalDenoiser(sample_size=4).fit(data)
    x_t = noisy(data[:2], model, 400)
    result = model(x_t, 400, generator=torch.Generator().manual_seed(5))
    z = torch.randn((4,) + tuple(x_t.shape), generator=torch.Generator().manual_seed(5))
    expected = torch.stack([optimal(x_t + 0.3 * z[j], 400) for j in range(4)]).mean(0)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-4)
    unsmoothed = SmoothedCFDMDenoiser(sample_size=4, num_noise=1, smoothing_std=0.0).fit(data)
    torch.testing.assert_close(unsmoothed(x_t, 400), optimal(x_t, 400))


@pytest.mark.parametrize("cls", [NearestDatasetDenoiser, OptimalDenoiser, SmoothedCFDMDenoiser, WienerDenoiser, PCALocalityDenoiser])
def test_fit_save_load_round_trip(cls, tmp_path):
    data = images(12, channels=1)
    model = cls(sample_size=4, in_channels=1).fit([(batch, 0) for batch in data.split(5)])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.num_samples == 12
    x_t = noisy(data[:2], model, 250)
    torch.testing.assert_close(loaded(x_t, 250, generator=torch.Generator().manual_seed(0)),
                               model(x_t, 250, generator=torch.Generator().manual_seed(0)))


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="not fitted"):
        OptimalDenoiser(sample_size=4)(images(1), 10)
    model = WienerDenoiser(sample_size=4).fit(images(5))
    with pytest.raises(ValueError, match="sample"):
        model(images(1, size=5), 10)
    with pytest.raises(ValueError, match="timestep"):
        model(images(1), 1000)
    with pytest.raises(ValueError, match="dataset"):
        WienerDenoiser(sample_size=4).fit(images(5, size=5))
    with pytest.raises(ValueError, match="streaming"):
        PCALocalityDenoiser(streaming="chunk")
    with pytest.raises(ValueError, match="num_neighbors"):
        OptimalDenoiser(num_neighbors=0)
    with pytest.raises(ValueError, match="smoothing_std"):
        SmoothedCFDMDenoiser(smoothing_std=-1.0)
