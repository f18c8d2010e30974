"""Roles as LoRA adapters on one frozen base (DESIGN.md §4, ``roles.mode: lora``).

The teacher's backbone becomes the shared base: each trainable denoiser role (student, fake score) is a separate
peft LoRA adapter injected into it, and the teacher is the same base with adapters disabled. One copy of the big
network serves every role, so a DMD2-style run costs about one model plus small adapters instead of three models.

Switching roles per forward pass sets peft's active-adapter flags on every LoRA layer directly (``_active_adapter``,
``_disable_adapters``) instead of calling ``set_adapter``, because ``set_adapter`` also flips ``requires_grad`` of the
other adapters, which would undo the freezing that methods rely on (``methods/dmd.py`` ``frozen``). Tests check that
the teacher view equals the base model and that gradients reach only the owning adapter.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.utils.checkpoint
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .denoisers import Cond, Denoiser
from .parameterization import Prediction


#: the layers LoRA adapts in UNet2DModel backbones: every conv and linear layer of the resnets, the down- and
#: upsampling convs, attention and time embedding (the breadth of the LCM-LoRA scripts' UNet list, ECOSYSTEM.md §2.2)
UNET2D_TARGETS = (r".*(conv1|conv2|conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|time_emb_proj|to_q|to_k|"
                  r"to_v|to_out\.0|linear_1|linear_2)$")


def add_adapters(base: nn.Module, names: list[str], *, rank: int, alpha: float, target_modules: str = UNET2D_TARGETS,
                 seed: int = 0) -> None:
    """Inject one LoRA adapter per name into ``base`` (in place). ``lora_B`` starts at zero: every role starts
    exactly as the base model (Hu et al. 2021, §4.1)."""
    base.requires_grad_(False)
    for name in names:
        torch.manual_seed(seed)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True)
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            try:
                inject_adapter_in_model(cfg, base, adapter_name=name)
            except ValueError as err:  # peft: no layer matches, or a layer type it cannot adapt
                raise ValueError(f"roles.mode: lora: no layer of {type(base).__name__} can take a LoRA adapter "
                                 f"({type(err).__name__}); use roles.mode: full") from None
    for name in names:
        for p in adapter_parameters(base, name):
            p.data = p.data.float()  # peft creates them in the base's dtype: trained weights stay float32
            p.requires_grad_(True)


def lora_layers(base: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(base: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in base.named_parameters() if f".{name}." in n and ".lora_" in n]


def adapter_state_dict(base: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's adapter-neutral keys (``...conv1.lora_A.weight``), so one adapter's
    state loads into another (progressive distillation's stage teacher) and matches peft's saved format."""
    return {n.replace(f".{name}.", "."): p for n, p in base.named_parameters() if f".{name}." in n and ".lora_" in n}


_NOT_SET = object()


@contextlib.contextmanager
def active(base: nn.Module, name: str | None):
    """Run ``base`` with only adapter ``name`` active (``None``: adapters disabled, i.e. the teacher)."""
    layers = lora_layers(base)
    before = [(m._active_adapter, m._disable_adapters) for m in layers]
    before_name = base.__dict__.get("_stepdistill_adapter", _NOT_SET)
    for m in layers:
        m._disable_adapters = name is None
        if name is not None:
            m._active_adapter = name
    base.__dict__["_stepdistill_adapter"] = name  # read by consistent_checkpoint
    try:
        yield
    finally:
        for m, (adapter, disabled) in zip(layers, before):
            m._active_adapter, m._disable_adapters = adapter, disabled
        if before_name is _NOT_SET:
            base.__dict__.pop("_stepdistill_adapter", None)
        else:
            base.__dict__["_stepdistill_adapter"] = before_name


def consistent_checkpoint(base: nn.Module):
    """A ``gradient_checkpointing_func`` for diffusers backbones whose state changes between forward and backward.

    Activation checkpointing re-runs a block's forward during backward. By then another role's adapter may be active
    (the student's backward runs after the teacher's and the fake score's forwards), and a network that was frozen
    for one forward (DMD2's GAN term through the fake score, ``methods/dmd.py`` ``frozen``) is trainable again. The
    recompute must see what the original forward saw, or torch refuses it (or, worse, gradients are wrong): torch's
    ``context_fn`` re-enters the recorded adapter and ``requires_grad`` flags for the recompute.
    """

    def checkpoint(module, *args):
        name = base.__dict__.get("_stepdistill_adapter", _NOT_SET)
        params = list(module.parameters())
        flags = [p.requires_grad for p in params]

        @contextlib.contextmanager
        def as_in_forward():
            now = [p.requires_grad for p in params]
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            try:
                with active(base, name) if name is not _NOT_SET else contextlib.nullcontext():
                    yield
            finally:
                for p, flag in zip(params, now):
                    p.requires_grad_(flag)

        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), as_in_forward()))

    return checkpoint


def merged_copy(base: nn.Module, name: str) -> nn.Module:
    """A plain float32 backbone (same class, no peft layers) whose weights are ``base`` with adapter ``name`` merged.

    The merge runs in float32 whatever the base is stored in: merging into a bf16 base (``roles.teacher_dtype``)
    would round ``W + scale * B @ A`` to bf16 and lose most of the trained delta, which is small next to ``W``.
    """
    tmp = copy.deepcopy(base).float()
    for m in lora_layers(tmp):
        if name in m.lora_A:
            m.merge(adapter_names=[name])
    state = {}
    for key, value in tmp.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    plain = type(base).from_config(base.config)
    plain.load_state_dict(state)
    return plain


class AdapterDenoiser(Denoiser):
    """A role that is one adapter of a shared base (``adapter=None``: the frozen base itself, i.e. the teacher).

    Wraps the teacher's own adapter (``inner``, any ``denoisers.py`` class), so every family works the same way: each
    call runs ``inner`` with only this role's adapter active. ``trainable_parameters`` / ``role_state_dict`` cover
    the adapter only, so optimizers and checkpoints hold what the role owns, not the shared base.
    """

    def __init__(self, inner: Denoiser, adapter: str | None):
        super().__init__(inner.schedule, inner.prediction)
        self.inner = inner
        self.adapter = adapter

    @property
    def backbone(self) -> nn.Module:
        return self.inner.backbone

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> Prediction:
        with active(self.backbone, self.adapter):
            return self.inner(x_t, t, cond)

    def null_cond(self, cond: Cond) -> Cond:
        return self.inner.null_cond(cond)

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.fresh_noise(like, generator)

    @property
    def sampling_guidance(self) -> float | None:
        return self.inner.sampling_guidance

    def feature_modules(self) -> list[nn.Module]:
        return self.inner.feature_modules()

    def feature_map(self, out, x_t: torch.Tensor) -> torch.Tensor:
        return self.inner.feature_map(out, x_t)

    def feature_channels(self) -> list[int]:
        return self.inner.feature_channels()

    @property
    def bottleneck(self) -> int:
        return self.inner.bottleneck

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [] if self.adapter is None else adapter_parameters(self.backbone, self.adapter)

    def role_state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.adapter is None else adapter_state_dict(self.backbone, self.adapter)

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.role_state_dict()
        if own.keys() != state.keys():
            missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
            raise KeyError(f"adapter {self.adapter!r}: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def plain_backbone(self) -> nn.Module:
        """The student as a stock backbone (adapter merged, a new module), for export."""
        return merged_copy(self.backbone, self.adapter)
