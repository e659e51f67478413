"""Fed-SB (Singhal et al., 2025): LoRA's B and A fixed and shared, clients train an r x r matrix R between them.

A targeted layer's weight is W0 + s B R A, with B (out x r) and A (r x in) the same on every client and the server
and frozen. Clients train only R (and the heads); the server averages R with weights p_k, which is exact:
sum_k p_k (W0 + s B R_k A) = W0 + s B (sum_k p_k R_k) A. Uplink and downlink: r^2 numbers per layer, whatever the
layer's size.

Where B, A and the first R come from (`init`):

- "lora_sb" (the paper's; LoRA-SB, arXiv 2411.19557): from an approximation of full fine-tuning's first step.
  In round 0 (`fed_trainer.round.GradientRound`) each sampled client sends its mean gradient G_k of the loss with
  respect to every targeted base weight over its first `init_examples` examples; with G = sum_k p_k G_k, the
  first Adam step dW = -lr sign(G) has the rank-r truncated SVD U_r S_r V_r^T, and B = U_r, A = V_r^T,
  R = S_r / s: round 1 starts from W0 + (the best rank-r approximation of dW). B and A then reach each client once,
  in its first message after round 0 (a client that loses them is sent them again).
- "lora_xs" (LoRA-XS, arXiv 2405.17604): from the pretrained weight, computed alike by every party (nothing
  travels, no round 0): W0 = U S V^T gives B = U_r S_r and A = V_r^T, and R starts at zero, so round 1 starts from
  the pretrained model.

R sits inside PEFT's LoRA layer: the adapter's A module keeps A (frozen) and R (trainable) and presents their product
R A as its `weight`, so PEFT's forward and merge compute s B (R A) unchanged, and `merged_model()` is PEFT's merge.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from peft.utils import transpose
from torch import nn

from fed_trainer.distributed import is_client_parallel
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.client_ledger import ClientLedger
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.strategies.lora import ADAPTER, LoraStrategy
from fed_trainer.strategies.registry import register_strategy

INITS = ("lora_sb", "lora_xs")
BASES = ("basis_B", "basis_A")  # the message parts that carry a layer's B and A


class RotatedDown(nn.Module):
    """LoRA's A module with a trainable r x r R after the frozen A: x -> R A x; `weight` is R A (r x in)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(a, requires_grad=False)
        self.R = nn.Parameter(torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.R @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.R)


def without_bases(tensors: TensorDict) -> tuple[TensorDict, TensorDict]:
    """(`tensors` less every layer's B and A, those B and A)."""
    bases = {key: t for key, t in tensors.items() if parse(key).part in BASES}
    return {key: t for key, t in tensors.items() if key not in bases}, bases


@register_strategy("fed_sb")
class FedSB(LoraStrategy):
    """LoRA's B and A fixed (from the clients' first gradients, or from the pretrained weight's SVD), only the r x r R
    trained and averaged: exact, r^2 per layer each way.

    Args:
        init: "lora_sb" (B, A and R from the truncated SVD of -lr sign(G), G the clients' mean gradient in round 0;
            the paper's) or "lora_xs" (B, A from the pretrained weight's SVD, R = 0; no round 0).
        init_examples: with "lora_sb", the examples each client of round 0 takes its mean gradient over (its first
            ones in training order, in whole batches).
        init_learning_rate: with "lora_sb", the lr of dW = -lr sign(G); None: a tenth of the run's
            `learning_rate` (on BBC News the best of the rates swept, over 5 and 38 rounds, where the clients' own
            rate did far worse, and again on SmolLM2 instruction tuning: docs/results.md). LoRA-SB's code uses the
            peak rate divided by the warmup steps.

    Round 0's aggregate is a float32 sum of every targeted weight's gradient (out*in per layer), kept where the
    server state lives (`server_state_device`, whose "auto" sizes it: `fed_trainer.memory_model`); each layer's
    SVD then runs on the model's device, one layer at a time.
    """

    title = "Fed-SB"
    paper = ("Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private) Federated "
             "LoRA Fine-Tuning", "2502.15436")  # fmt: skip
    # the SVD needs each whole base weight in full precision, and the gradient round dense gradients of it: not
    # under ZeRO-3 partitions, nor of a 4/8-bit base
    capabilities = dataclasses.replace(LoraStrategy.capabilities, exact=True, zero3=False, reads_base=True)

    def __init__(self, init: str = "lora_sb", init_examples: int = 64, init_learning_rate: float | None = None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"strategy 'fed_sb' takes init in {INITS}, not {init!r}.")
        if init_examples < 1:
            raise ValueError(f"strategy 'fed_sb' needs init_examples >= 1, not {init_examples}.")
        self.init, self.init_learning_rate = init, init_learning_rate
        self.gradient_examples = init_examples if init == "lora_sb" else 0
        # client -> whether its machine holds B and A (its update arrived since they were sent); not in `state_dict`:
        # a resumed run assumes nothing of the clients' machines, so each client's first message carries them again
        self.holding = ClientLedger()

    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        if self.gradient_examples:
            if args.dp_noise_multiplier is not None:
                raise ValueError(
                    "strategy 'fed_sb' with init='lora_sb' starts with a round in which the clients send their raw "
                    "gradients, which client-level DP does not cover: use strategy_kwargs={'init': 'lora_xs'} with "
                    "dp_noise_multiplier."
                )
            if args.world_size > 1 and not is_client_parallel(args):
                raise ValueError(
                    "strategy 'fed_sb' with init='lora_sb' takes its clients' gradients in one process: run the "
                    "processes client-parallel (client_parallel=True, no DeepSpeed), or use strategy_kwargs="
                    "{'init': 'lora_xs'}."
                )
        return super().setup(model, args, peft_configs)

    def prepare_adapter(self, model: nn.Module) -> None:
        for layer in self.layers.values():
            b_param = layer.lora_B[ADAPTER].weight
            a_old = layer.lora_A[ADAPTER].weight
            b_param.requires_grad_(False)
            if self.gradient_examples:  # B and A come from round 0; until then R = 0 makes them irrelevant
                layer.lora_A[ADAPTER] = RotatedDown(a_old.detach().clone())
                continue
            weight = transpose(layer.get_base_layer().weight.detach().float(), getattr(layer, "fan_in_fan_out", False))
            if weight.dim() != 2:
                raise ValueError("strategy 'fed_sb' supports Linear (and Conv1D) layers only, not convolutions.")
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            r = a_old.shape[0]
            with torch.no_grad():
                b_param.copy_((u[:, :r] * s[:r]).to(b_param.dtype))
            layer.lora_A[ADAPTER] = RotatedDown(vh[:r].to(device=a_old.device, dtype=a_old.dtype).contiguous())

    def gradient_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {message_key(name, "gradient"): layer.get_base_layer().weight for name, layer in self.layers.items()}

    def carries_bases(self, tensors: TensorDict) -> bool:
        return message_key(next(iter(self.layers)), "basis_A") in tensors

    def bases(self) -> TensorDict:
        """Every layer's B and A as message entries."""
        out = {}
        for name, layer in self.layers.items():
            out[message_key(name, "basis_B")] = layer.lora_B[ADAPTER].weight.detach()
            out[message_key(name, "basis_A")] = layer.lora_A[ADAPTER].A.detach()
        return out

    def load_bases(self, tensors: TensorDict) -> None:
        """Copy the B and A entries of `tensors` (a `bases()`) into the live adapters."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.lora_B[ADAPTER].weight.copy_(tensors[message_key(name, "basis_B")])
                layer.lora_A[ADAPTER].A.copy_(tensors[message_key(name, "basis_A")])

    def begin_round(self, round_number: int) -> None:
        if round_number <= 1:  # round 0 sums gradients: round 1 rebuilds the running sum for R and the heads
            self._sum = None
        super().begin_round(round_number)
        self.holding.begin_round()

    def server_message(self, client_id) -> TensorDict:
        message = super().server_message(client_id)
        if not self.gradient_examples or self.round_number == 0 or client_id is None:
            return message
        held = self.holding.get(client_id, False)
        self.holding.note(client_id, False)  # unknown until its update arrives: a failed client may have lost them
        return message if held else {**message, **self.bases()}

    def sent_message(self, message: TensorDict) -> TensorDict:
        """A compressed downlink compresses R and the heads; B and A travel exact (a client must hold the server's)."""
        rest, bases = without_bases(message)
        return {**super().sent_message(rest), **bases}

    def received_message(self, sent: TensorDict) -> TensorDict:
        rest, bases = without_bases(sent)
        return {**super().received_message(rest), **bases}

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        super().load_client(model, message, client_id)
        if self.carries_bases(message):
            self.load_bases(message)

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        """On a client's own machine: B and A from the message (its first after round 0) or from what the machine
        kept; kept for its next round."""
        if not self.gradient_examples or self.round_number == 0:
            return {}
        source = message if self.carries_bases(message) else kept
        if not self.carries_bases(source):
            raise RuntimeError(
                "this client's machine does not hold Fed-SB's B and A from round 0 (was its state lost?); it is "
                "dropped this round and sent them the next time."
            )
        self.load_bases(source)
        return {k: t.detach().clone() for k, t in without_bases(source)[1].items()}

    def global_tensors(self, model: nn.Module) -> TensorDict:
        """The LoRA strategies' global tensors and every layer's frozen A (which a freshly built model lacks after
        round 0)."""
        frozen = {id(layer.lora_A[ADAPTER].A) for layer in self.layers.values()}
        return {**super().global_tensors(model), **{n: p for n, p in model.named_parameters() if id(p) in frozen}}

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        if self.round_number == 0:  # gradients: combined as the run's rule says, never clipped (not updates)
            self.collect(payload, weight, client_id)
            return
        super().aggregate(payload, weight, client_id)
        if self.gradient_examples:
            self.holding.note(client_id, True)

    def synchronize(self) -> None:
        super().synchronize()
        self.holding.synchronize()

    def finish_round(self, model: nn.Module) -> None:
        if self.round_number > 0:
            super().finish_round(model)
            return
        gradients = self.round_aggregate()
        rate = self.args.learning_rate / 10 if self.init_learning_rate is None else self.init_learning_rate
        bases = {}
        for name, layer in self.layers.items():  # one layer at a time on the model's device (SVDs on a GPU)
            gradient = gradients.pop(message_key(name, "gradient"))
            step = gradient.to(layer.get_base_layer().weight.device, torch.float32, copy=True).sign_().mul_(-rate)
            b, r, a = first_step_factors(transpose(step, getattr(layer, "fan_in_fan_out", False)),
                                         layer.lora_B[ADAPTER].weight.shape[1], layer.scaling[ADAPTER])  # fmt: skip
            bases.update({message_key(name, "basis_B"): b, message_key(name, "basis_A"): a})
            self.global_state[f"{name}.lora_A.{ADAPTER}.R"].copy_(r)
        self.load_bases(bases)
        self.restore_global(model)


def first_step_factors(step: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """(B, R, A) with s B R A the rank-`rank` truncated SVD of `step` (out x in): B = U_r, R = S_r / s, A = V_r^T."""
    u, s, vh = torch.linalg.svd(step, full_matrices=False)
    return u[:, :rank].contiguous(), torch.diag(s[:rank] / scaling), vh[:rank].contiguous()
