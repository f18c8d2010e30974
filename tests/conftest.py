"""Shared fixtures: the schedules every math test runs over, and a one-thread guard for tiny CPU workloads."""

import pytest
import torch

from stepdistill.schedules import EDM, RectifiedFlow, TrigFlow, VPCosine, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER


#: a Stable-Diffusion-like DDPM config (1000 steps, scaled_linear 0.00085 -> 0.012, non-zero terminal SNR)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}

SCHEDULE_FACTORIES = {
    "vp_default": lambda: VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER),
    "vp_sd": lambda: VPDiscrete.from_scheduler_config(SD_SCHEDULER),
    "vp_cosine": VPCosine,
    "edm": EDM,
    "rf": RectifiedFlow,
    "rf_shift3": lambda: RectifiedFlow(shift=3.0),
    "trigflow": TrigFlow,
}


@pytest.fixture(params=list(SCHEDULE_FACTORIES))
def any_schedule(request):
    """Every schedule kind (two VP-discrete configs, rectified flow with shift 1 and 3)."""
    return SCHEDULE_FACTORIES[request.param]()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and 2-D mixtures run several times faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
