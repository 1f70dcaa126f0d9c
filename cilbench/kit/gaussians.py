"""Per-class multivariate Gaussians in one feature space (SEED's class representation; usable by any
generative-classifier method).

A class is fitted by full-covariance maximum likelihood (mean, covariance divided by N) plus eps * I, where
eps starts at 1e-8 and grows x10 until the regularised covariance passes a test (SEED's official code,
grypesc/SEED `src/approach/seed.py` create_distributions and `src/approach/gmm.py`). The test, `eps_test`:

- `inverse` (the official code's): cov + eps * I in float32 has an inverse (torch.inverse) and that inverse
  has a Cholesky factor; the code's GaussianMixture takes its log-determinant from the Cholesky factor of the
  float32 precision matrix and raises there otherwise.
- `cholesky`: cov + eps * I in float32 has a Cholesky factor (cilbench before the option existed).

They part where the covariance is singular or ill-conditioned, e.g. a class with fewer feature rows than
dimensions (<= 32 images + their flips at S = 64): the float32 inverse is inaccurate long after the Cholesky
factor exists. On random 64-d features with 8-48 rows, `inverse` ends at 1000x (up to 10^4x) the eps of
`cholesky`; with 128+ rows they mostly agree (tests/test_seed_fidelity.py).

The official code also starts a class at the eps the previous class of the same expert and task ended with
(callers pass the start as `eps`; SEED's `eps_carry`). The store keeps the Cholesky factors and log-determinants,
so log-likelihoods of a batch against every class are one batched triangular solve on the device, never a
Python loop over classes. Statistics and likelihoods are float64 (a covariance regularised by eps * I = 1e-8 is
too ill-conditioned for float32 solves); only the test runs in float32, on the device, as the official code's.
"""
from __future__ import annotations

import math

import torch

EPS_START = 1e-8
EPS_FACTOR = 10.0
EPS_TRIES = 20          # 1e-8 * 10^19: far beyond any feature scale; reaching it means the features are broken


EPS_TESTS = ("inverse", "cholesky")


def passes_eps_test(cov: torch.Tensor, eps: float, test: str) -> bool:
    """Whether cov + eps * I is accepted (module docstring): `inverse` = its float32 inverse exists and has a
    Cholesky factor; `cholesky` = it has a float32 Cholesky factor. eps is added in float32, as the official
    code adds it to its float32 covariance (near the threshold the outcome hangs on those last bits). It must
    also have the float64 Cholesky factor the store keeps."""
    c32 = cov.to(torch.float32) + torch.eye(len(cov), dtype=torch.float32, device=cov.device) * eps
    if test == "inverse":
        inverse, info = torch.linalg.inv_ex(c32)
        ok = int(info) == 0 and bool(torch.isfinite(inverse).all()) and \
            int(torch.linalg.cholesky_ex(inverse)[1]) == 0
    elif test == "cholesky":
        ok = int(torch.linalg.cholesky_ex(c32)[1]) == 0
    else:
        raise ValueError(f"eps test must be one of {EPS_TESTS}, got {test!r}")
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return ok and int(torch.linalg.cholesky_ex(cov + eps * eye)[1]) == 0


def fit_gaussian(features: torch.Tensor, eps: float = EPS_START,
                 test: str = "inverse") -> tuple[torch.Tensor, torch.Tensor, float]:
    """MLE mean and covariance of the rows of `features` (N x S), with eps * I added and eps raised x10 until
    the covariance passes `test` (passes_eps_test). Returns (mean, covariance including eps * I, eps used)."""
    x = features.detach().to(torch.float64)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"fit_gaussian needs an N x S matrix with N >= 1, got shape {tuple(x.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / len(x)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(EPS_TRIES):
        if passes_eps_test(cov, eps, test):
            return mean, cov + eps * eye, eps
        eps *= EPS_FACTOR
    raise ValueError(f"covariance has no Cholesky factor even with eps = {eps / EPS_FACTOR:g}; "
                     "the features contain inf/nan")


def kl_divergence(mean0, cov0, mean1, cov1) -> torch.Tensor:
    """KL(N0 || N1) for batches of Gaussians (broadcast over leading dims), closed form:
    1/2 [tr(S1^-1 S0) + (m1 - m0)^T S1^-1 (m1 - m0) - S + ln|S1| - ln|S0|]."""
    l0, l1 = torch.linalg.cholesky(cov0), torch.linalg.cholesky(cov1)
    s = mean0.shape[-1]
    m = torch.linalg.solve_triangular(l1, l0, upper=False)                       # L1^-1 L0
    trace = (m * m).sum(dim=(-2, -1))                                           # tr(S1^-1 S0)
    d = torch.linalg.solve_triangular(l1, (mean1 - mean0).unsqueeze(-1), upper=False).squeeze(-1)
    maha = (d * d).sum(dim=-1)
    logdet0 = 2 * torch.log(torch.diagonal(l0, dim1=-2, dim2=-1)).sum(dim=-1)
    logdet1 = 2 * torch.log(torch.diagonal(l1, dim1=-2, dim2=-1)).sum(dim=-1)
    return 0.5 * (trace + maha - s + logdet1 - logdet0)


def pairwise_kl(means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """C x C matrix of KL(q_i || q_j) among C Gaussians (zeros on the diagonal)."""
    c = len(means)
    i, j = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
    return kl_divergence(means[i], covs[i], means[j], covs[j])


def symmetric_kl(mean0, cov0, mean1, cov1) -> torch.Tensor:
    """d_KL = KL(N0 || N1) + KL(N1 || N0)."""
    return kl_divergence(mean0, cov0, mean1, cov1) + kl_divergence(mean1, cov1, mean0, cov0)


class GaussianStore:
    """The Gaussians of a growing set of classes in one feature space, ready for batched scoring.

    `labels[i]` is the class of the i-th stored Gaussian. `log_likelihood(z)` returns B x len(labels).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.device = torch.device(device)
        self.labels: list[int] = []
        self.eps: list[float] = []
        self.means = torch.empty(0, dim, dtype=torch.float64, device=self.device)
        self.covs = torch.empty(0, dim, dim, dtype=torch.float64, device=self.device)
        self.chol = torch.empty(0, dim, dim, dtype=torch.float64, device=self.device)
        self.logdet = torch.empty(0, dtype=torch.float64, device=self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, label: int, mean: torch.Tensor, cov: torch.Tensor, eps: float) -> None:
        mean = mean.to(self.device, torch.float64)
        cov = cov.to(self.device, torch.float64)
        chol = torch.linalg.cholesky(cov)
        self.labels.append(int(label))
        self.eps.append(float(eps))
        self.means = torch.cat([self.means, mean[None]])
        self.covs = torch.cat([self.covs, cov[None]])
        self.chol = torch.cat([self.chol, chol[None]])
        self.logdet = torch.cat([self.logdet, 2 * torch.log(torch.diagonal(chol)).sum()[None]])

    def fit(self, label: int, features: torch.Tensor, eps: float = EPS_START, test: str = "inverse") -> float:
        """Fit and add the Gaussian of `label` from its feature rows, eps growing from `eps` until `test` passes;
        returns the eps that was needed."""
        mean, cov, eps = fit_gaussian(features, eps, test)
        self.add(label, mean, cov, eps)
        return eps

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        """ln N(z_b | mu_c, Sigma_c) for every row b of z and every stored class c (B x C), float64:
        -1/2 [ln|Sigma_c| + S ln 2pi + (z - mu_c)^T Sigma_c^-1 (z - mu_c)]."""
        z = z.to(self.device, torch.float64)
        diff = (z[None, :, :] - self.means[:, None, :]).transpose(1, 2)           # C x S x B
        w = torch.linalg.solve_triangular(self.chol, diff, upper=False)         # L_c^-1 (z - mu_c)
        maha = (w * w).sum(dim=1)                                               # C x B
        return (-0.5 * (self.logdet[:, None] + self.dim * math.log(2 * math.pi) + maha)).T

    def overlap(self) -> float:
        """Mean of the full directed KL matrix among the stored classes (SEED's expert-selection score; eq. 2
        up to the constant 1 / C^2). 0 for fewer than two classes."""
        if len(self) < 2:
            return 0.0
        return float(pairwise_kl(self.means, self.covs).mean())

    def params(self) -> int:
        """Stored numbers as SEED's eq. 3 counts them: S (mean) + S(S+1)/2 (symmetric covariance) per class."""
        return len(self) * (self.dim + self.dim * (self.dim + 1) // 2)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "labels": list(self.labels), "eps": list(self.eps),
                "means": self.means.cpu(), "covs": self.covs.cpu()}

    @classmethod
    def from_state(cls, state: dict, device) -> "GaussianStore":
        store = cls(int(state["dim"]), device)
        for label, eps, mean, cov in zip(state["labels"], state["eps"], state["means"], state["covs"]):
            store.add(label, mean, cov, eps)
        return store
