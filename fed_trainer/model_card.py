"""The "Federated training" section of the model card `FederatedTrainer` writes, from a template: the set-up of
the run, the paper of its strategy (each strategy contributes its own, as TRL's trainers do) and the final metrics
of the global model."""

from __future__ import annotations

from string import Template
from typing import TYPE_CHECKING

from fed_trainer.privacy import privacy_spent
from fed_trainer.quantized import merged_dtype, quantization_of

if TYPE_CHECKING:
    from fed_trainer.trainer import FederatedTrainer

SECTION = Template("""
## Federated training

Trained with [fed_trainer](https://pypi.org/project/fed-trainer/)'s `FederatedTrainer`.

- strategy: `$strategy`$paper
$quantized- local optimizer: `$optimizer`
- rounds: $rounds of $num_rounds
- clients: $num_clients ($per_round per round)
- local steps per round: $local_steps
- partition: `$partition`$alpha
- client weighting: `$weighting`
- aggregation rule: `$rule`$clip
$privacy
Final metrics of the global model:

$metrics
""")


def card_tags(trainer: FederatedTrainer) -> list[str]:
    """The Hub tags of a federated model: the library's, federated learning's and the strategy's name."""
    return ["fed_trainer", "federated-learning", trainer.strategy.name]


def federated_section(trainer: FederatedTrainer) -> str:
    """The model card's "Federated training" section for the run `trainer` has done so far."""
    args, strategy = trainer.args, trainer.strategy
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    final = {k: v for k, v in (rounds[-1] if rounds else {}).items() if k.startswith("eval_") or k == "train_loss"}
    paper = f" ([{strategy.paper[0]}](https://arxiv.org/abs/{strategy.paper[1]}))" if strategy.paper else ""
    local = f"{args.local_steps}" if args.local_steps is not None else f"{args.local_epochs} epochs"
    privacy = ""
    if args.dp_noise_multiplier is not None and rounds:
        privacy = (
            f"- differential privacy: client-level DP-FedAvg, noise multiplier {args.dp_noise_multiplier}; "
            f"(epsilon, delta) = ({privacy_spent(args, len(rounds)):.3g}, {args.dp_delta:g}) after {len(rounds)} "
            "rounds (opacus RDP accountant)\n"
        )
    quantized = quantization_of(trainer.model)
    if quantized:
        quantized = (
            f"- base: {quantized} (bitsandbytes), frozen; the clients trained LoRA adapters on it. The saved model is "
            f"the dequantized base in {str(merged_dtype(trainer.model)).removeprefix('torch.')} with the adapters "
            "added: it loads without peft or bitsandbytes and computes what the quantized model with adapters "
            "computes, up to the rounding of the compute dtype (and, on an 8-bit base, of the activations)\n"
        )
    return SECTION.substitute(
        strategy=strategy.name,
        paper=paper,
        quantized=quantized or "",
        optimizer=getattr(args.optim, "value", args.optim),
        rounds=len(rounds),
        num_rounds=args.num_rounds,
        num_clients=len(trainer.client_datasets),
        per_round=args.clients_sampled_per_round,
        local_steps=local,
        partition=args.partition,
        alpha=f" (alpha={args.partition_alpha})" if args.partition == "dirichlet" else "",
        weighting=args.client_weighting,
        rule=args.aggregation_rule,
        clip=f", updates clipped to L2 norm {args.update_clip_norm}" if args.update_clip_norm is not None else "",
        privacy=privacy,
        metrics="\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items()),
    )
