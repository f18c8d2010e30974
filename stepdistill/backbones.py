"""Backbones built in code (stock diffusers classes, so the students built from them export as stock pipelines),
and the DDPM schedule the project's own teachers train on."""

from __future__ import annotations


#: the DDPM schedule the project's own teachers train on; 1024 steps so that every power-of-two student grid lands
#: on integer timesteps (a student grid must be expressible by the teacher's schedule, DESIGN.md §6).
DEFAULT_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1024,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


def vector_unet(dim: int, *, width: int = 64, layers: int = 1, num_classes: int | None = None,
                time_dim: int | None = None):
    """A residual MLP for vector data, expressed as a diffusers ``UNet2DModel`` on ``[B, dim, 1, 1]`` inputs.

    One block, no down/up-sampling, no attention, ``norm_num_groups=1`` (LayerNorm over channels): on a 1x1 input
    each 3x3 convolution acts through its centre tap only, so the network is an MLP with a sinusoidal time embedding.
    Being a stock ``UNet2DModel`` is what lets ``DDPMPipeline`` load and run the exported student without custom code;
    the price is that 8/9 of each conv kernel is inert (measured cost in the README). Training need not pay it:
    ``teacher_training.PointwiseView`` trains the centre taps alone, as matrix products.

    ``time_dim`` is the time embedding's width, ``width`` by default (diffusers' own default is ``4 * width``): the
    per-block time projections then cost as much as a conv instead of four times as much, and the fit
    (``benchmarks/teacher_fit.py``) was no worse. The fitted GMM teachers and the fresh students of the exact one
    share this architecture.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=1, in_channels=dim, out_channels=dim, block_out_channels=(width,), layers_per_block=layers,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=1, add_attention=False,
        num_class_embeds=None if num_classes is None else num_classes + 1, time_embedding_dim=time_dim or width,
    )


def digits_unet(*, width: int = 32):
    """The embedded 8x8 digits teacher's backbone: two resolutions (8, 4), no attention (a third cheaper on CPU)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(width, 2 * width), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, add_attention=False,
    )


def tiny_unet2d():
    """A random tiny UNet2DModel (16x16x3) for smoke runs and tests."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )
