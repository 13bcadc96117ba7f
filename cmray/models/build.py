"""A model's network from its config: the U-Net inside the parametrization its kind names."""

from __future__ import annotations

from cmray.core.parametrization import ConsistencyFunction, Parametrization
from cmray.models.config import ZERO_BOUNDARY, ModelConfig, NoiseConfig
from cmray.nets.unet import UNet
from cmray.nets.weighting import AdaptiveWeight


def parametrization(kind: str, noise: NoiseConfig, sigma_data: float) -> Parametrization:
    """Appendix C scalings for f_theta; sigma_min = 0 gives the EDM denoiser D (teacher), which
    ECT and sCM students keep (f(x, 0) = x; for sCM it is TrigFlow's f)."""
    sigma_min = 0.0 if kind in ZERO_BOUNDARY else noise.sigma_min
    return Parametrization("edm", sigma_data, sigma_min, noise.sigma_max, noise.c_noise_scale)


def build_model(cfg: ModelConfig) -> ConsistencyFunction:
    """Eq. 5's f_theta around the U-Net (or D for kind ``edm``), freshly initialised; an sCM
    model also carries its adaptive weight w_phi."""
    logvar = AdaptiveWeight() if cfg.kind == "scm" else None
    p = parametrization(cfg.kind, cfg.noise, cfg.sigma_data)
    return ConsistencyFunction(UNet(cfg.net), p, logvar)
