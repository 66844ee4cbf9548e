"""World-token codebooks: k-means, product and residual quantisation of world latents (pure torch).

A codebook maps a world latent z [D] to a world token: the index of its nearest code. Three layouts,
all stored as one tensor `centroids` [G, v, d]:
- "none":     one codebook of v codes (G = 1, d = D); the vocabulary is v.
- "product":  the latent is cut into G contiguous parts (zero-padded to G * d, d = ceil(D / G)) and
              each part has its own v codes; the token is the G part indices (v**G combinations).
- "residual": G stages over the full latent (d = D); stage g quantises what stages < g left over;
              the token is the G stage indices and the reconstruction is the sum of the chosen codes.

Fitting (`fit_codebook`) runs k-means++ on a sample, then mini-batch k-means updates (per-code
learning rate 1 / hits so far, as in Sculley 2010) with re-seeding of codes that stop being used,
then optional full Lloyd passes. Every random draw comes from one CPU generator seeded with
`seed`, so the same options and data give the same codebook bit for bit on the same machine; the
heavy arithmetic runs on `device` (a GPU when there is one). Assignment inside a policy
(`Codebook.encode`) computes distances in float64 so the token of a latent does not depend on the
batch it arrives in (matrix-product kernels sum in an order that depends on the batch shape).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

FACTORISATIONS = ("none", "product", "residual")
# Bumped when the file layout changes.
CODEBOOK_FORMAT_VERSION = 1
# Key of the JSON metadata inside the safetensors file.
META_KEY = "world_codebook"


class CodebookError(ValueError):
    """A codebook file is missing, damaged, or does not fit the policy; the message names the fix."""


@dataclass(frozen=True)
class FitOptions:
    """How a codebook is fitted (recorded in the codebook's metadata)."""

    codes: int = 1024  # v: codes per codebook (the vocabulary is v ** factors)
    factorisation: str = "none"  # "none", "product" (latent parts) or "residual" (stages)
    factors: int = 1  # G: number of codebooks (1 for "none")
    normalise: bool = False  # L2-normalise latents before fitting and before every assignment
    seed: int = 0  # seed of every random draw (sample, init, mini-batches)
    iters: int = 100  # mini-batch iterations per codebook
    batch_size: int = 4096  # rows per mini-batch
    lloyd_iters: int = 0  # full Lloyd passes over the sample after the mini-batch phase
    sample_cap: int | None = 200_000  # fit on at most this many rows (drawn with the seed); None = all
    init_sample: int | None = None  # rows k-means++ picks from; None = max(4 * codes, batch_size)

    def validate(self) -> None:
        """Raise CodebookError naming the flag to fix when the options are inconsistent."""
        if self.factorisation not in FACTORISATIONS:
            raise CodebookError(f"factorisation must be one of {FACTORISATIONS}, got '{self.factorisation}'.")
        if self.factorisation == "none" and self.factors != 1:
            raise CodebookError(
                "factorisation 'none' uses one codebook: set --factors=1 (or pick product/residual)."
            )
        if self.factorisation != "none" and self.factors < 2:
            raise CodebookError(
                f"factorisation '{self.factorisation}' needs --factors >= 2, got {self.factors}."
            )
        if self.codes < 2 or self.iters < 0 or self.batch_size < 1 or self.lloyd_iters < 0:
            raise CodebookError("Need --codes >= 2, --iters >= 0, --batch_size >= 1 and --lloyd_iters >= 0.")


def part_dim(dim: int, factorisation: str, factors: int) -> int:
    """d: the width of each codebook's codes for a latent of `dim` (see the module docstring)."""
    return math.ceil(dim / factors) if factorisation == "product" else dim


def _prepare(x: Tensor, normalise: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalise else x


def _split_parts(x: Tensor, factors: int, d: int) -> Tensor:
    """[..., D] -> [..., G, d], zero-padding the last part (zeros add nothing to any distance)."""
    pad = factors * d - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], factors, d)


def nearest(x: Tensor, centroids: Tensor, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """(index [N], squared distance [N]) of each row of x [N, d] to its nearest centroid [v, d].

    Distances are ||x||^2 - 2 x.c + ||c||^2 in the dtype of the inputs, `chunk` rows at a time.
    Ties go to the lower index.
    """
    c_sq = (centroids * centroids).sum(-1)
    idx, dist = [], []
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        d2 = torch.addmm(c_sq, xb, centroids.T, alpha=-2.0) + (xb * xb).sum(-1, keepdim=True)
        m, i = d2.min(dim=1)
        idx.append(i)
        dist.append(m.clamp(min=0))
    if not idx:
        return torch.empty(0, dtype=torch.long, device=x.device), torch.empty(0, device=x.device)
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k initial centroids picked from the rows of x [n, d] by k-means++ (D^2 sampling)."""
    n = x.shape[0]
    x_sq = (x * x).sum(-1)

    def sq_dist(i: int) -> Tensor:
        # ||x - x_i||^2 through one matrix-vector product: no [n, d] temporary per step.
        return (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp(min=0)

    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    closest = sq_dist(first)
    for _ in range(1, k):
        weights = closest.double().cpu()
        total = float(weights.sum())
        # All rows already coincide with a centroid (fewer distinct rows than codes): pick uniformly.
        pick = (
            int(torch.multinomial(weights / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        centroids.append(x[pick])
        closest = torch.minimum(closest, sq_dist(pick))
    return torch.stack(centroids)


def _cluster_sums(x: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-code sums [k, d] and counts [k] of the rows of x assigned to each code.

    A one-hot matrix product: deterministic, and on CPU far faster than `index_add_`.
    """
    onehot = torch.zeros(x.shape[0], k, device=x.device, dtype=x.dtype).scatter_(1, assign.unsqueeze(1), 1.0)
    return onehot.T @ x, onehot.sum(0)


def fit_kmeans(x: Tensor, options: FitOptions, gen: torch.Generator, device: torch.device) -> Tensor:
    """Centroids [v, d] of x [N, d] (CPU or `device`): k-means++, mini-batch updates, Lloyd passes."""
    n, k = x.shape[0], options.codes
    if n < k:
        raise CodebookError(
            f"Cannot fit {k} codes on {n} latents: lower --codes (at most {n}) or use a larger dataset."
        )
    init_rows = min(n, options.init_sample or max(4 * k, options.batch_size))
    init_idx = torch.randperm(n, generator=gen)[:init_rows]
    centroids = kmeans_plus_plus(x[init_idx].to(device, torch.float32), k, gen)
    counts = torch.zeros(k, device=device)
    recent = torch.zeros(k, device=device)
    for it in range(1, options.iters + 1):
        xb = x[torch.randint(n, (min(options.batch_size, n),), generator=gen)].to(device, torch.float32)
        assign, dist = nearest(xb, centroids)
        sums, hits = _cluster_sums(xb, assign, k)
        counts += hits
        recent += hits
        # Sculley's update with a per-code rate h / H (hits in this batch / hits so far):
        # c <- c + (h / H) (batch mean - c); codes without hits keep their place (h = 0).
        rate = (hits / counts.clamp(min=1)).unsqueeze(1)
        centroids += rate * (sums / hits.clamp(min=1).unsqueeze(1) - centroids)
        if it % 10 == 0:
            # Codes unused for 10 mini-batches are moved onto the worst-quantised rows of this batch.
            dead = (recent == 0).nonzero().flatten()
            if dead.numel():
                far = dist.argsort(descending=True)[: dead.numel()]
                centroids[dead[: far.numel()]] = xb[far]
                counts[dead] = counts[counts > 0].min() if bool((counts > 0).any()) else 1.0
            recent.zero_()
    for _ in range(options.lloyd_iters):
        sums = torch.zeros_like(centroids)
        hits = torch.zeros(k, device=device)
        for start in range(0, n, 16384):
            xb = x[start : start + 16384].to(device, torch.float32)
            chunk_sums, chunk_hits = _cluster_sums(xb, nearest(xb, centroids)[0], k)
            sums += chunk_sums
            hits += chunk_hits
        hit = hits > 0  # an empty cluster keeps its centroid
        centroids[hit] = sums[hit] / hits[hit].unsqueeze(1)
    return centroids


class Codebook(nn.Module):
    """A fitted codebook as a module: `centroids` [G, v, d] is a buffer, so it travels in checkpoints.

    `encode(z [..., D]) -> tokens [..., G]` (long), `decode(tokens) -> [..., D]` (in the normalised
    space when `normalise`), `flat(tokens) -> [...]` one index in [0, v**G).
    """

    def __init__(
        self, dim: int, codes: int, factors: int = 1, factorisation: str = "none", normalise: bool = False
    ):
        super().__init__()
        if factorisation not in FACTORISATIONS:
            raise CodebookError(f"factorisation must be one of {FACTORISATIONS}, got '{factorisation}'.")
        self.dim, self.codes, self.factors = dim, codes, factors
        self.factorisation, self.normalise = factorisation, normalise
        d = part_dim(dim, factorisation, factors)
        self.register_buffer("centroids", torch.zeros(factors, codes, d))

    @property
    def vocabulary(self) -> int:
        """Number of distinct tokens, v ** G."""
        return self.codes**self.factors

    def encode(self, z: Tensor, exact: bool = True) -> Tensor:
        """Tokens [..., G] of latents z [..., D].

        `exact` computes distances in float64, so a latent gets the same token in any batch (what the
        policy uses); False uses float32, faster for statistics over a whole cache.
        """
        if z.shape[-1] != self.dim:
            raise CodebookError(
                f"Latent dim {z.shape[-1]} does not match the codebook's dim {self.dim}: the codebook was "
                "fitted on another encoder or camera set. Refit it with lerobot-wm-fit-codebook."
            )
        lead = z.shape[:-1]
        dtype = torch.float64 if exact else torch.float32
        x = _prepare(z.reshape(-1, self.dim).to(dtype), self.normalise)
        c = self.centroids.to(dtype)
        if self.factorisation == "product":
            parts = _split_parts(x, self.factors, c.shape[-1])
            tokens = [nearest(parts[:, g], c[g])[0] for g in range(self.factors)]
        else:
            tokens, residual = [], x
            for g in range(self.factors):
                idx, _ = nearest(residual, c[g])
                tokens.append(idx)
                residual = residual - c[g][idx]
        return torch.stack(tokens, dim=-1).reshape(*lead, self.factors)

    def decode(self, tokens: Tensor) -> Tensor:
        """Reconstruction [..., D] of tokens [..., G] (in the L2-normalised space when `normalise`)."""
        chosen = torch.stack([self.centroids[g][tokens[..., g]] for g in range(self.factors)], dim=-2)
        if self.factorisation == "product":
            return chosen.flatten(-2)[..., : self.dim]
        return chosen.sum(-2)

    def flat(self, tokens: Tensor) -> Tensor:
        """One index per token in [0, v**G): the G indices read as digits in base v."""
        out = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
        for g in range(self.factors):
            out = out * self.codes + tokens[..., g]
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "centroids"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.centroids.shape):
            raise CodebookError(
                f"The checkpoint's codebook has shape {tuple(state_dict[key].shape)} [factors, codes, dim] but "
                f"the config describes {tuple(self.centroids.shape)}. The config and weights come from "
                "different runs: load both from the same checkpoint directory."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit_codebook(
    latents: Tensor, options: FitOptions, device: str | torch.device = "cpu"
) -> tuple[Codebook, dict]:
    """Fit a codebook on latents [N, D]; returns it (on CPU) and its statistics for the metadata.

    Rows beyond `options.sample_cap` are dropped at random (with the seed) before fitting; usage,
    perplexity and quantisation error are measured on the rows fitted on.
    """
    options.validate()
    if latents.ndim != 2:
        raise CodebookError(f"Expected latents [N, D], got shape {tuple(latents.shape)}.")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(options.seed)
    started = time.perf_counter()
    n_total = latents.shape[0]
    x = latents.float()
    if options.sample_cap is not None and n_total > options.sample_cap:
        x = x[torch.randperm(n_total, generator=gen)[: options.sample_cap].sort().values]
    x = _prepare(x, options.normalise)
    book = Codebook(
        latents.shape[1], options.codes, options.factors, options.factorisation, options.normalise
    )
    d = book.centroids.shape[-1]
    if options.factorisation == "product":
        parts = _split_parts(x, options.factors, d)
        for g in range(options.factors):
            book.centroids[g] = fit_kmeans(parts[:, g].contiguous(), options, gen, device).cpu()
    else:
        residual = x
        for g in range(options.factors):
            book.centroids[g] = fit_kmeans(residual, options, gen, device).cpu()
            if g + 1 < options.factors:
                idx, _ = nearest(residual.to(device), book.centroids[g].to(device))
                residual = residual - book.centroids[g][idx.cpu()]
    seconds = time.perf_counter() - started
    stats = codebook_stats(book, x, prepared=True)
    return book, {
        **stats,
        "rows_total": n_total,
        "rows_fitted": int(x.shape[0]),
        "fit_seconds": round(seconds, 3),
    }


def codebook_stats(book: Codebook, latents: Tensor, prepared: bool = False) -> dict:
    """Usage (fraction of codes used), perplexity per codebook and quantisation error on `latents`.

    `relative_error` is the squared error over the total variance (the fraction of variance the
    codebook does not explain); `mse` the mean squared error per latent element.
    """
    x = latents.float() if prepared else _prepare(latents.float(), book.normalise)
    tokens = torch.cat([book.encode(x[s : s + 65536], exact=False) for s in range(0, x.shape[0], 65536)])
    usage, perplexity = [], []
    for g in range(book.factors):
        p = torch.bincount(tokens[:, g], minlength=book.codes).double() / max(1, tokens.shape[0])
        usage.append(round(float((p > 0).double().mean()), 6))
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        perplexity.append(round(float(entropy.exp()), 4))
    sq = sum(
        float(((x[s : s + 65536] - book.decode(tokens[s : s + 65536])) ** 2).sum())
        for s in range(0, x.shape[0], 65536)
    )
    total_var = float(((x - x.mean(0)) ** 2).sum())
    return {
        "usage": usage,
        "perplexity": perplexity,
        "mse": sq / max(1, x.numel()),
        "relative_error": sq / total_var if total_var > 0 else 0.0,
    }


def centroid_digest(book: Codebook) -> str:
    """sha256 of the centroids' bytes: names exactly this codebook (recorded in policy configs)."""
    return "sha256:" + hashlib.sha256(book.centroids.contiguous().numpy().tobytes()).hexdigest()


def save_codebook(path: str | Path, book: Codebook, meta: dict) -> Path:
    """Write `path` (.safetensors: centroids + metadata) and a readable `.json` twin, each atomically."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "format_version": CODEBOOK_FORMAT_VERSION,
        "dim": book.dim,
        "codes": book.codes,
        "factors": book.factors,
        "factorisation": book.factorisation,
        "normalise": book.normalise,
        "digest": centroid_digest(book),
    }
    text = json.dumps(meta, sort_keys=True, indent=2)
    atomic_write_bytes(path, save({"centroids": book.centroids.contiguous()}, metadata={META_KEY: text}))
    atomic_write_bytes(path.with_suffix(".json"), (text + "\n").encode())
    return path


def load_codebook(path: str | Path) -> tuple[Codebook, dict]:
    """Read a codebook written by `save_codebook`; CodebookError with the fix when it is missing or damaged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise CodebookError(
            f"No codebook at {path}. Fit one on the training dataset's latent cache with "
            "`lerobot-wm-fit-codebook --dataset.repo_id=... [--dataset.root=...]`, then pass the path it "
            "prints as --policy.codebook_path."
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            centroids = f.get_tensor("centroids")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise CodebookError(
            f"Damaged codebook file {path} ({err!r}); refit it with lerobot-wm-fit-codebook."
        ) from err
    if meta.get("format_version") != CODEBOOK_FORMAT_VERSION:
        raise CodebookError(
            f"Codebook {path} has format version {meta.get('format_version')}, this plugin reads "
            f"{CODEBOOK_FORMAT_VERSION}: refit it with lerobot-wm-fit-codebook."
        )
    book = Codebook(meta["dim"], meta["codes"], meta["factors"], meta["factorisation"], meta["normalise"])
    book.load_state_dict({"centroids": centroids})
    return book, meta


def options_dict(options: FitOptions) -> dict:
    """The options as a JSON-ready dict (for metadata and file names)."""
    return asdict(options)
