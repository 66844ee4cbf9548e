"""World-token codebooks: cluster recovery, determinism, factorised layouts, file round trip and errors."""

import json

import pytest
import torch

from lerobot_policy_world_modality.world.codebook import (
    Codebook,
    CodebookError,
    FitOptions,
    fit_codebook,
    load_codebook,
    save_codebook,
)


def clusters(n_clusters=12, dim=24, per_cluster=300, spread=0.3, seed=0):
    """Well-separated Gaussian clusters: (points [N, dim], true labels [N])."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 8
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    return centers[labels] + spread * torch.randn(labels.numel(), dim, generator=g), labels


def purity(tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of points whose token's majority label is their own label."""
    agree = sum(int(torch.bincount(labels[tokens == t]).max()) for t in tokens.unique())
    return agree / labels.numel()


@pytest.mark.parametrize("normalise", [False, True])
def test_kmeans_recovers_separated_clusters(normalise):
    x, labels = clusters()
    options = FitOptions(codes=12, normalise=normalise, iters=40, batch_size=512, seed=3)
    book, stats = fit_codebook(x, options)
    tokens = book.flat(book.encode(x))
    assert purity(tokens, labels) >= 0.99
    assert tokens.unique().numel() == 12 and stats["usage"] == [1.0]
    assert stats["perplexity"][0] > 11.5  # the clusters are equally populated
    if normalise:  # assignment normalises too: a rescaled latent keeps its token
        assert torch.equal(book.encode(x * 5.0), book.encode(x))
    # The test can fail: half the codes cannot separate 12 clusters.
    few, _ = fit_codebook(x, FitOptions(codes=6, iters=40, batch_size=512, seed=3))
    assert purity(few.flat(few.encode(x)), labels) < 0.6


def test_mini_batch_updates_lower_the_quantisation_error():
    """Overlapping clusters: k-means++ seeding alone is not the optimum; the mini-batch phase improves it."""
    x, _ = clusters(n_clusters=40, per_cluster=50, spread=6.0)
    _, seeded = fit_codebook(x, FitOptions(codes=16, iters=0, lloyd_iters=0, batch_size=256, seed=2))
    _, trained = fit_codebook(x, FitOptions(codes=16, iters=60, lloyd_iters=0, batch_size=256, seed=2))
    assert trained["relative_error"] < 0.97 * seeded["relative_error"]


@pytest.mark.parametrize("factorisation", ["product", "residual"])
def test_factorised_codebooks_recover_clusters_and_reconstruct(factorisation):
    # 16 clusters built as 4 x 4 combinations: for product quantisation each latent half carries one
    # factor; for residual quantisation a coarse factor (large offsets) plus a fine one (small offsets).
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(16, (3000,), generator=g)
    if factorisation == "product":
        first, second = torch.randn(4, 10, generator=g) * 8, torch.randn(4, 10, generator=g) * 8
        x = torch.cat([first[labels // 4], second[labels % 4]], dim=1)
    else:
        coarse, fine = torch.randn(4, 20, generator=g) * 20, torch.randn(4, 20, generator=g) * 3
        x = coarse[labels // 4] + fine[labels % 4]
    x = x + 0.2 * torch.randn(3000, 20, generator=g)
    book, stats = fit_codebook(
        x, FitOptions(codes=4, factorisation=factorisation, factors=2, iters=40, batch_size=512)
    )
    tokens = book.encode(x)
    assert tokens.shape == (3000, 2) and book.vocabulary == 16
    assert purity(book.flat(tokens), labels) >= 0.99
    assert stats["relative_error"] < 0.01
    assert torch.allclose(book.decode(tokens), x, atol=1.5)


def test_product_quantisation_pads_odd_dims():
    x = torch.randn(400, 7)
    book, _ = fit_codebook(
        x, FitOptions(codes=4, factorisation="product", factors=2, iters=5, batch_size=128)
    )
    assert book.centroids.shape == (2, 4, 4)
    assert book.decode(book.encode(x)).shape == (400, 7)


def test_same_seed_same_codebook_other_seed_differs():
    x, _ = clusters(n_clusters=20, per_cluster=100, spread=2.0)
    # No Lloyd pass: it would make any mini-batch order converge to the same centroids and hide the draws.
    options = FitOptions(codes=16, iters=20, batch_size=256, lloyd_iters=0, seed=5, sample_cap=1500)
    a, stats_a = fit_codebook(x, options)
    b, stats_b = fit_codebook(x, options)
    assert torch.equal(a.centroids, b.centroids)
    assert stats_a["rows_fitted"] == 1500 and stats_a["rows_total"] == 2000
    c, _ = fit_codebook(x, FitOptions(**{**options.__dict__, "seed": 6}))
    assert not torch.equal(a.centroids, c.centroids)


def test_assignment_does_not_depend_on_the_batch():
    # A large common offset: float32 distances there lose the digits that separate near codes.
    x = torch.randn(1200, 256, generator=torch.Generator().manual_seed(0)) + 300.0
    book, _ = fit_codebook(x, FitOptions(codes=64, iters=10, batch_size=256))
    together = book.encode(x)
    alone = torch.cat([book.encode(row).unsqueeze(0) for row in x[:300]])
    assert torch.equal(together[:300], alone)
    assert book.encode(x.view(40, 30, 256)).shape == (40, 30, 1)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    x, _ = clusters(n_clusters=4, per_cluster=50)
    book, stats = fit_codebook(x, FitOptions(codes=4, iters=5, batch_size=64, normalise=True))
    path = save_codebook(tmp_path / "cb" / "book.safetensors", book, {"note": "test", **stats})
    assert path.with_suffix(".json").is_file()
    loaded, meta = load_codebook(path)
    assert torch.equal(loaded.centroids, book.centroids) and loaded.normalise and meta["note"] == "test"
    assert meta["dim"] == 24 and meta["codes"] == 4 and meta["digest"].startswith("sha256:")
    assert not list(path.parent.glob(".*tmp*"))  # atomic writes leave no temp files

    with pytest.raises(CodebookError, match="lerobot-wm-fit-codebook"):
        load_codebook(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a codebook")
    with pytest.raises(CodebookError, match="Damaged"):
        load_codebook(tmp_path / "bad.safetensors")
    with pytest.raises(CodebookError, match="dim 5 does not match"):
        book.encode(torch.randn(3, 5))
    from safetensors.torch import save_file

    from lerobot_policy_world_modality.world.codebook import META_KEY

    future = tmp_path / "future.safetensors"  # written by a later plugin version
    save_file({"centroids": book.centroids}, str(future), metadata={META_KEY: json.dumps({**meta, "format_version": 999})})
    with pytest.raises(CodebookError, match="format version 999, this plugin reads .*refit it"):
        load_codebook(future)
    wrong = Codebook(24, 8)
    with pytest.raises(CodebookError, match="same checkpoint"):
        wrong.load_state_dict(book.state_dict())
    with pytest.raises(CodebookError, match="Cannot fit 4 codes on 3"):
        fit_codebook(x[:3], FitOptions(codes=4))
    with pytest.raises(CodebookError, match="--factors"):
        fit_codebook(x, FitOptions(codes=4, factorisation="product", factors=1))
