"""A check shared by the LoRA-roles tests of every teacher kind."""

import torch

from stepdistill.methods.base import loss_terms
from stepdistill.roles import frozen


def check_gradients_reach_only_the_owning_adapter(nets, method, batch) -> None:
    """The student phase's loss reaches the student adapter only, the critic phase's the fake score only; the shared
    frozen base never gets a gradient."""
    base = nets.teacher.backbone

    def touched():
        frozen = [p for n, p in base.named_parameters() if ".lora_" not in n]
        return {"student": any(p.grad is not None for p in nets.student.trainable_parameters()),
                "fake_score": any(p.grad is not None for p in nets["fake_score"].trainable_parameters()),
                "base": any(p.grad is not None for p in frozen)}

    batch.generator = torch.Generator().manual_seed(1)
    with frozen([nets["fake_score"]]):  # as the loop runs the student phase
        method("student", nets, batch).loss.mean().backward()
    assert touched() == {"student": True, "fake_score": False, "base": False}
    base.zero_grad(set_to_none=True)
    with frozen([nets.student]):
        for term in loss_terms(method("fake_score", nets, batch)):
            term.loss.mean().backward()
    assert touched() == {"student": False, "fake_score": True, "base": False}
