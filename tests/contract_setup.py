"""The set-up every strategy of the contract matrix runs with (tests/test_contract.py), shared with the two-rank
worker (tests/contract_ranks.py) so that both sides build the same trainer."""

import user_strategy  # noqa: F401  (registers damped_fedavg)
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig

from fed_trainer import FederatedTrainer
from fed_trainer.strategies.capabilities import registered
from fed_trainer.strategies.registry import strategy_class

STRATEGIES = [*registered(built_in=True), "damped_fedavg"]
GALORE = dict(optim="galore_adamw", optim_target_modules=["attention", "intermediate", "output.dense"],
              optim_args="rank=4,update_proj_gap=2,scale=0.25")  # fmt: skip
CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]

# What the two-rank case adds per strategy, to exercise each part of the cross-rank merge (3 clients on 2 ranks: rank
# 0 trains two of them, rank 1 one; dropout on, so each client's random stream must not depend on its rank).
# Every strategy runs 2 of 3 clients a round over 3 rounds, so a client moves between ranks and what each client
# keeps (SCAFFOLD's control variates, FLoRA's folded stacks, GaLore's projector sketches) must follow it.
TWO_RANKS = dict(clients_per_round=2, num_rounds=3, save_every_rounds=1, save_total_limit=2)
TWO_RANK_OPTIONS = {
    "fedit": dict(aggregation_rule="median"),  # every payload gathered on every rank
    "fedex_lora": dict(server_optimizer="fedadam"),  # a second running sum (the products) reduced over ranks
    "fedavg": dict(clients_per_round=None),  # all 3 clients; client 1 raises in round 2 (tests/contract_ranks.py)
    # every round evaluated on each client's held-out quarter (2, 4 and 6 examples), each set spread over the ranks as
    # evaluate() spreads an eval set; one example a batch, so no rank pads its last batch with repeated examples
    # (whose losses Trainer's distributed eval_loss would include, as it does for evaluate()); and each client's
    # model fine-tuned 2 steps from the global one (every rank fine-tunes every client alike)
    "ffa_lora": dict(
        client_eval_split=0.25, eval_strategy="epoch", per_device_eval_batch_size=1, personalization_steps=2
    ),
    # nf4 uplinks with error feedback: each client's residual follows it from rank to rank
    "scaffold": dict(update_compression="nf4", compression_error_feedback=True),
}


def build(make_config, strategy: str, callbacks=(), dropout: float = 0.0, data_collator=None, **config):
    """A `FederatedTrainer` of `strategy` on tiny BERT and `CLIENTS`: full weights, GaLore clients or LoRA (rank 4;
    ranks 2, 4, 4 for a strategy that takes heterogeneous ranks) as the strategy declares."""
    caps = strategy_class(strategy).capabilities
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return FederatedTrainer(
        model=tiny_bert(dropout=dropout),
        args=make_config(strategy=strategy, learning_rate=2e-2 if caps.lora else 1e-3,
                         **(GALORE if caps.local_optimizer else {}), **config),
        client_datasets=CLIENTS, callbacks=list(callbacks), data_collator=data_collator,
        peft_config=lora if caps.lora else None,
        client_peft_configs=[2, 4, 4] if caps.heterogeneous_ranks else None,
    )  # fmt: skip
