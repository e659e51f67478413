#!/usr/bin/env python
"""Federated preference tuning (DPO) of a causal LM with TRL's DPOTrainer as every client's trainer: each client holds
the preference pairs of one topic.

Runs offline with no arguments: the bundled SmolLM2-135M-Instruct on preference pairs built from chatterbot-corpus
(`fed_trainer.assets.chatterbot_preference_pairs`): the prompt is a question, `chosen` its own answer, `rejected`
the answer to a random question of another topic (fluent but off the point), one client per topic file (21).
Each client trains against the round's global model as its reference (docs/llm.md). After training, the global
model is also evaluated against the initial model as the reference (`eval_vs_initial_*`): its reward accuracy is
the share of held-out pairs whose chosen answer gained more likelihood over the run than the rejected one.

    python examples/fed_dpo.py
    python examples/fed_dpo.py --strategy fedit --learning_rate 5e-5
    python examples/fed_dpo.py --beta 0.5 --loss_type ipo

Every `DPOConfig` option applies to the clients' local training (`--beta`, `--loss_type`, `--max_length`, ...).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOTrainer

from fed_trainer import FederatedDPOConfig, FederatedDPOTrainer
from fed_trainer.assets import chatterbot_preference_pairs, load_chatterbot_qa, smollm2_path
from fed_trainer.cli import (
    EXAMPLE_DEFAULTS,
    LoraArguments,
    QuantizationArguments,
    parse_args_with_recipe,
    train_save_evaluate,
)
from fed_trainer.client import client_training_args
from fed_trainer.distributed import end_process_group

logger = logging.getLogger(__name__)

# The embedded default run: 4 of the 21 topic clients per round, 3 rounds of 5 local steps, full weights; a few
# minutes on 2 CPU cores. TRL's bf16 and gradient checkpointing defaults are off: this runs in fp32 on CPUs.
DEFAULTS = dict(
    **EXAMPLE_DEFAULTS,
    output_dir="fed_dpo_output",
    num_rounds=3,
    clients_per_round=4,
    local_steps=5,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=16,
    learning_rate=5e-6,
    warmup_steps=0,
    max_length=96,
    bf16=False,
    gradient_checkpointing=False,
)


@dataclass
class ModelArguments(QuantizationArguments, LoraArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A causal LM with a chat template (default: the bundled SmolLM2-135M)."}
    )


@dataclass
class DataArguments:
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out preference pairs evaluated."})


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args_with_recipe(
        (ModelArguments, DataArguments, FederatedDPOConfig), sys.argv[1:] if argv is None else argv, DEFAULTS
    )
    set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    qa = load_chatterbot_qa(seed=training_args.seed)
    train = chatterbot_preference_pairs(qa["train"], seed=training_args.seed)
    validation = chatterbot_preference_pairs(qa["validation"], seed=training_args.seed).remove_columns("topic")
    validation = validation.shuffle(seed=training_args.seed)
    validation = validation.select(range(min(len(validation), data_args.max_eval_samples)))
    clients = {
        name: train.filter(lambda e, name=name: e["topic"] == name).remove_columns("topic")
        for name in sorted(set(train["topic"]))
    }
    logger.info("%d clients: %s", len(clients), {name: len(ds) for name, ds in clients.items()})

    model_path = model_args.model_name_or_path or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = FederatedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, **model_args.model_kwargs(training_args)),
        args=training_args,
        client_datasets=clients,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=model_args.peft_config(training_args.strategy, task_type="CAUSAL_LM"),
        client_peft_configs=model_args.lora_ranks,
    )
    metrics = train_save_evaluate(trainer)
    # the whole run's effect: the global model against the initial one as DPO's reference, with the clients' settings
    evaluation = DPOTrainer(
        model=trainer.merged_model(),
        ref_model=AutoModelForCausalLM.from_pretrained(model_path, **model_args.model_kwargs(training_args)),
        args=client_training_args(trainer.args),
        train_dataset=validation,
        processing_class=tokenizer,
    ).evaluate(eval_dataset=validation)
    against_initial = {key.replace("eval_", "eval_vs_initial_", 1): value for key, value in evaluation.items()}
    trainer.log_metrics("eval", against_initial)
    trainer.save_metrics("eval_vs_initial", against_initial)
    return {**metrics, **against_initial}


if __name__ == "__main__":
    main()
    end_process_group()
