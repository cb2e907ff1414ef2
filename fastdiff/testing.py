"""The oracle kit: data laws whose optimal denoiser E[x_0 | x_t] is exact.

Diffusion code can be wrong and still make pretty pictures. For these laws the
Bayes-optimal prediction is known in closed form for any schedule, so tests (ours and
yours) can demand that a sampler reproduces the law, that the variational bound is an
upper bound on the exact NLL, and so on.

    mix = GaussianMixture.three_component_2d()
    model = mix.model(fastdiff.NoiseSchedule.linear(1000), prediction="eps")
    x = fastdiff.sample(model, (4096, 2), steps=1000, clip_denoised=False)

Everything is computed in float64 and returned in the input's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fastdiff.diffusion import PREDICTIONS, _check_choice
from fastdiff.schedule import NoiseSchedule
from fastdiff.sde import SDE


def prediction_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_cumprod: torch.Tensor, prediction: str):
    """Turn E[x_0 | x_t] into the eps / x0 / v prediction; all three are affine in x_0,
    so the Bayes-optimal one follows exactly. alpha_cumprod broadcasts against x_t."""
    if prediction == "x0":
        return x0
    eps = (x_t - alpha_cumprod.sqrt() * x0) / (1.0 - alpha_cumprod).sqrt()
    if prediction == "eps":
        return eps
    return alpha_cumprod.sqrt() * eps - (1.0 - alpha_cumprod).sqrt() * x0


class OracleModel(torch.nn.Module):
    """model(x_t, t) -> the exact eps / x0 / v prediction of an oracle's data law.

    `schedule` is a NoiseSchedule (t: LongTensor of timesteps) or a continuous-time
    `fastdiff.sde.SDE` (t: float tensor of times, x_t = alpha(t) x_0 + sigma(t) eps)."""

    def __init__(self, oracle, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__()
        if not isinstance(schedule, (NoiseSchedule, SDE)):
            raise TypeError(f"schedule must be a fastdiff.NoiseSchedule or a fastdiff.sde.SDE, "
                            f"got {type(schedule).__name__}")
        self.oracle = oracle
        self.schedule = schedule
        self.prediction = _check_choice("prediction", prediction, PREDICTIONS)
        self.sample_shape = tuple(oracle.sample_shape)

    @property
    def num_classes(self) -> Optional[int]:
        """Labels 0..num_classes-1; num_classes itself is "no label" (classifier-free guidance)."""
        return getattr(self.oracle, "num_classes", None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x_t.to(torch.float64)
        if isinstance(self.schedule, SDE):
            return self._continuous(x, t, y).to(x_t.dtype)
        ac = self.schedule.alphas_cumprod.to(x.device)[t.long()].reshape(-1, *([1] * (x.dim() - 1)))
        x0 = self.oracle.posterior_mean(x, ac) if y is None else self.oracle.posterior_mean(x, ac, y=y)
        return prediction_from_x0(x, x0, ac, self.prediction).to(x_t.dtype)


    def _continuous(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        shape = (-1, *([1] * (x.dim() - 1)))
        t = t.to(torch.float64).cpu()
        alpha = self.schedule.alpha(t).reshape(shape).to(x.device)
        sigma = self.schedule.sigma(t).reshape(shape).to(x.device)
        # x / sqrt(alpha^2 + sigma^2) is a VP x_t with abar = alpha^2 / (alpha^2 + sigma^2)
        scale = torch.sqrt(alpha ** 2 + sigma ** 2)
        ac = (alpha / scale) ** 2
        x_vp = x / scale
        x0 = self.oracle.posterior_mean(x_vp, ac) if y is None else self.oracle.posterior_mean(x_vp, ac, y=y)
        if self.prediction == "x0":
            return x0
        eps = (x - alpha * x0) / sigma
        return eps if self.prediction == "eps" else alpha * eps - sigma * x0


class OracleClassifier(torch.nn.Module):
    """classifier(x_t, t) -> log p(y | x_t) for every class (B, num_classes), exactly:
    the noised law's class posterior, differentiable in x_t (classifier guidance)."""

    def __init__(self, oracle: "GaussianMixture", schedule: NoiseSchedule):
        super().__init__()
        if oracle.classes is None:
            raise ValueError("the mixture has no classes: build it with classes=[...]")
        self.oracle, self.schedule = oracle, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        ac = self.schedule.alphas_cumprod.to(x.device)[t.long()].reshape(-1, 1)
        return self.oracle.class_log_posterior(x, ac).to(x_t.dtype)


class GaussianMixture:
    """p(x_0) = sum_k w_k N(mu_k, Sigma_k) in R^D.

    Under q, x_t | component k ~ N(sqrt(abar) mu_k, abar Sigma_k + (1 - abar) I): each
    component's posterior of x_0 is Gaussian and the component weights follow by Bayes.
    Covariances are given full (K, D, D) or diagonal (K, D) and stored by eigendecomposition,
    which diagonalises every noised covariance at once.
    """

    def __init__(self, means, covariances, weights: Optional[Sequence[float]] = None,
                 sample_shape: Optional[Sequence[int]] = None, classes: Optional[Sequence[int]] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        cov = torch.as_tensor(covariances, dtype=torch.float64)
        if cov.shape == (K, D):
            cov = torch.diag_embed(cov)
        if cov.shape != (K, D, D):
            raise ValueError(f"covariances must have shape ({K}, {D}) or ({K}, {D}, {D}), got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(-1, -2)):
            raise ValueError("covariances must be symmetric")
        eigvals, eigvecs = torch.linalg.eigh(cov)
        if (eigvals < 0).any():
            raise ValueError(f"covariances must be positive semi-definite, got eigenvalue {eigvals.min().item():.3g}")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or not math.isclose(w.sum().item(), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be {K} non-negative numbers summing to 1, got {w.tolist()}")
        self.means, self.covariances, self.weights = means, cov, w
        self.eigvals, self.eigvecs = eigvals.clamp(min=0.0), eigvecs
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (D,)
        if math.prod(self.sample_shape) != D:
            raise ValueError(f"sample_shape {self.sample_shape} must hold D={D} elements")
        # classes[k]: the label of component k (class-conditional law p(x | y))
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.int64)
        if self.classes is not None:
            if self.classes.shape != (K,) or self.classes.min() < 0:
                raise ValueError(f"classes must be {K} labels >= 0, got {list(classes)}")
            self.num_classes = int(self.classes.max()) + 1
            if set(self.classes.tolist()) != set(range(self.num_classes)):
                raise ValueError(f"classes must use every label 0..{self.num_classes - 1}, got {list(classes)}")

    @classmethod
    def three_component_2d(cls) -> "GaussianMixture":
        """Three unequal, anisotropic components in the plane (the tests' standard law)."""
        means = [[-0.9, -0.4], [0.8, -0.5], [0.0, 0.8]]
        rot = math.pi / 6
        c, s = math.cos(rot), math.sin(rot)
        r = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        tilted = r @ torch.diag(torch.tensor([0.12, 0.04], dtype=torch.float64) ** 2) @ r.T
        covs = torch.stack([tilted, torch.diag(torch.tensor([0.06, 0.15]) ** 2).double(),
                            torch.eye(2, dtype=torch.float64) * 0.1 ** 2])
        return cls(means, covs, weights=[0.5, 0.3, 0.2])

    @classmethod
    def two_class_2d(cls) -> "GaussianMixture":
        """Two classes, each a pair of anisotropic components (the guidance tests' law)."""
        means = [[-0.6, 0.3], [0.5, 0.6], [-0.2, -0.5], [0.7, -0.3]]
        covs = torch.tensor([[0.05, 0.02], [0.03, 0.06], [0.06, 0.03], [0.02, 0.05]], dtype=torch.float64) ** 2 * 10
        return cls(means, covs, weights=[0.3, 0.2, 0.25, 0.25], classes=[0, 0, 1, 1])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def model(self, schedule: NoiseSchedule, prediction: str = "eps") -> OracleModel:
        return OracleModel(self, schedule, prediction)

    def classifier(self, schedule: NoiseSchedule) -> OracleClassifier:
        return OracleClassifier(self, schedule)

    def conditional(self, label: int) -> "GaussianMixture":
        """The law p(x | y = label), a mixture of that class's components."""
        if self.classes is None:
            raise ValueError("the mixture has no classes")
        keep = self.classes == label
        if not keep.any():
            raise ValueError(f"label must be in [0, {self.num_classes - 1}], got {label}")
        w = self.weights[keep]
        return GaussianMixture(self.means[keep], self.covariances[keep], (w / w.sum()).tolist(), self.sample_shape)

    def class_log_posterior(self, x: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        """log p(y | x_t) for every class, (B, num_classes); x (B, D), alpha_cumprod (B, 1)."""
        log_pdf, _, _ = self._component_terms(x, alpha_cumprod)
        joint = log_pdf + self.weights.log()                                     # (B, K)
        per_class = torch.stack([torch.logsumexp(joint[:, self.classes == c], dim=1)
                                 for c in range(self.num_classes)], dim=1)
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self.eigvecs[labels], z * self.eigvals[labels].sqrt())
        x = x.reshape(n, *self.sample_shape)
        return (x, labels) if return_labels else x

    def _component_terms(self, x: torch.Tensor, alpha_cumprod: torch.Tensor):
        """Per component: log N(x; sqrt(abar) mu_k, abar Sigma_k + (1-abar) I), the residual
        in the eigenbasis and the noised eigenvalues. x: (B, D), alpha_cumprod: (B, 1)."""
        ac = alpha_cumprod.reshape(-1, 1, 1)                                      # (B, 1, 1)
        s = ac * self.eigvals.unsqueeze(0) + (1.0 - ac)                           # (B, K, D)
        diff = x.unsqueeze(1) - ac.sqrt() * self.means.unsqueeze(0)                # (B, K, D)
        r = torch.einsum("kji,bkj->bki", self.eigvecs, diff)                       # U_k^T diff
        log_pdf = -0.5 * ((r ** 2 / s).sum(-1) + s.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return log_pdf, r, s

    def log_prob(self, x: torch.Tensor, alpha_cumprod: float = 1.0) -> torch.Tensor:
        """log density of x under the law of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        ac = torch.full((x.shape[0], 1), float(alpha_cumprod), dtype=torch.float64)
        log_pdf, _, _ = self._component_terms(x, ac)
        return torch.logsumexp(log_pdf + self.weights.log(), dim=1)

    def responsibilities(self, x: torch.Tensor, alpha_cumprod: float = 1.0) -> torch.Tensor:
        """p(component | x_t), (B, K)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        ac = torch.full((x.shape[0], 1), float(alpha_cumprod), dtype=torch.float64)
        log_pdf, _, _ = self._component_terms(x, ac)
        return torch.softmax(log_pdf + self.weights.log(), dim=1)

    def posterior_mean(self, x_t: torch.Tensor, alpha_cumprod: torch.Tensor,
                       y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E[x_0 | x_t] = sum_k p(k | x_t) (mu_k + sqrt(abar) Sigma_k S_k^{-1} (x_t - sqrt(abar) mu_k)).

        With labels y (B,), E[x_0 | x_t, y]: only class y's components; y == num_classes
        means "no label" (the unconditional law)."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1).to(torch.float64)
        ac = alpha_cumprod.reshape(-1, 1).to(torch.float64).expand(shape[0], 1)
        log_pdf, r, s = self._component_terms(x, ac)
        logits = log_pdf + self.weights.log()
        if y is not None:
            if self.classes is None:
                raise ValueError("labels given to a mixture without classes")
            y = y.to(x.device).long().reshape(-1, 1)
            if y.min() < 0 or y.max() > self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}], got {y.flatten().tolist()[:8]}")
            allowed = (self.classes.unsqueeze(0) == y) | (y == self.num_classes)
            logits = logits.masked_fill(~allowed, -math.inf)
        resp = torch.softmax(logits, dim=1)                                         # (B, K)
        gain = ac.reshape(-1, 1, 1).sqrt() * self.eigvals.unsqueeze(0) / s         # (B, K, D)
        x0_k = self.means.unsqueeze(0) + torch.einsum("kij,bkj->bki", self.eigvecs, gain * r)
        return (resp.unsqueeze(-1) * x0_k).sum(1).reshape(shape)


class FiniteImageSet:
    """p(x_0) uniform over K images on the 256-level grid in [-1, 1].

    The posterior over the images given x_t is a softmax of -|x_t - sqrt(abar) x_k|^2 /
    (2 (1 - abar)), so E[x_0 | x_t] is exact; the exact NLL is log2(K) / D bits per dim.
    """

    def __init__(self, images: torch.Tensor):
        images = torch.as_tensor(images, dtype=torch.float64)
        if images.dim() < 2 or images.shape[0] < 1:
            raise ValueError(f"images must have shape (K, ...) with K >= 1, got {tuple(images.shape)}")
        levels = (images + 1.0) * 127.5
        if (images.abs() > 1.0).any() or not torch.allclose(levels, levels.round(), atol=1e-6):
            raise ValueError("images must lie on the 256-level grid k / 127.5 - 1, k = 0..255")
        self.images = images
        self.sample_shape = tuple(images.shape[1:])
        self._flat = images.reshape(images.shape[0], -1)
        self._sq_norms = (self._flat ** 2).sum(1)

    @classmethod
    def random(cls, K: int, shape: Sequence[int], seed: int = 0) -> "FiniteImageSet":
        g = torch.Generator().manual_seed(seed)
        levels = torch.randint(0, 256, (K, *shape), generator=g)
        return cls(levels.double() / 127.5 - 1.0)

    @property
    def K(self) -> int:
        return self.images.shape[0]

    @property
    def dim(self) -> int:
        return self._flat.shape[1]

    def exact_nll_bpd(self) -> float:
        return math.log2(self.K) / self.dim

    def model(self, schedule: NoiseSchedule, prediction: str = "eps") -> OracleModel:
        return OracleModel(self, schedule, prediction)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        idx = torch.randint(0, self.K, (n,), generator=generator)
        return self.images[idx]

    def posterior(self, x_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        """p(image k | x_t), (B, K)."""
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        ac = alpha_cumprod.reshape(-1, 1).to(torch.float64)
        logits = (ac.sqrt() * (x @ self._flat.T) - 0.5 * ac * self._sq_norms) / (1.0 - ac)
        return torch.softmax(logits, dim=1)

    def posterior_mean(self, x_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        return (self.posterior(x_t, alpha_cumprod) @ self._flat).reshape(x_t.shape)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(distance to the closest image, its index) for each x."""
        d = torch.cdist(x.reshape(x.shape[0], -1).double(), self._flat)
        return d.min(dim=1)
