"""Hyperparameters of each model, as pydantic models (torch-free, so configs validate fast).

Defaults follow docs/paper.md: embedding 100, a 100-unit ReLU head, S=1, eta=0.5, lambda=0.9.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sweep.strict_numbers import refuse_yes_no


class ModelParams(BaseModel):
    """Fields every model has. `name` picks the registry entry."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # as Strict

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_yes_no(cls, info.field_name, v)

    name: str
    hidden_size: int = Field(50, ge=1, le=4096, description="R, the number of recurrent hidden units")
    embed_size: int = Field(100, ge=1, le=4096, description="token embedding size")
    head_size: int = Field(100, ge=1, le=4096, description="units of the ReLU layer before the softmax")


class LSTMParams(ModelParams):
    name: Literal["lstm"] = "lstm"


class LNLSTMParams(ModelParams):
    name: Literal["ln_lstm"] = "ln_lstm"
    forget_bias: float = Field(1.0, description="added to the forget gate before the sigmoid")
    cell_form: Literal["fused", "autograd"] = Field(
        "fused",
        description="'fused': the whole sequence in one hand-differentiated kernel (fast); 'autograd': "
        "the readable per-step cell under autograd (reference); the same function",
    )


class FastWeightParams(ModelParams):
    """The fast-weight memory A(t) = decay * A(t-1) + fast_lr * v v^T, read S times per step."""

    fast_lr: float = Field(0.5, gt=0, le=10, description="eta, the fast weights' learning rate")
    decay: float = Field(0.9, gt=0, lt=1, description="lambda, the fast weights' decay rate")
    inner_steps: int = Field(1, ge=1, le=10, description="S, inner-loop reads of the memory per step")
    fw_form: Literal["fused", "attention", "matrix"] = Field(
        "fused",
        description="exact form of the recurrence: 'fused' (one hand-differentiated kernel per sequence, "
        "fastest), 'attention' (readable cell, reads over stored vectors) or 'matrix' (the papers' "
        "materialised A, reference); the same function",
    )


class FWRNNParams(FastWeightParams):
    name: Literal["fw_rnn"] = "fw_rnn"
    slow_init_scale: float = Field(0.05, ge=0, description="slow recurrent weight W initialised to this * I")
    variant: Literal["ba", "authors"] = Field(
        "ba", description="'ba': Ba et al.'s equations; 'authors': the TF cell's write-before-read variant"
    )


class FWLSTMParams(FastWeightParams):
    name: Literal["fw_lstm"] = "fw_lstm"
    forget_bias: float = Field(1.0, description="added to the forget gate before the sigmoid")
    memory: Literal["gates", "candidate"] = Field(
        "gates", description="fast weights on all four gates (4H x 4H) or on the candidate only (H x H)"
    )
    authors_inner_loop: bool = Field(
        False,
        description="reproduce the authors' quirk: the inner loop recomputes the same c, h, so S > 1 "
        "changes nothing",
    )
