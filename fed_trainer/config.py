"""`FederatedConfig`: `TrainingArguments` plus the federated knobs."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from fed_trainer.compression import BLOCK_SIZES
from fed_trainer.compression import FORMATS as COMPRESSION_FORMATS
from fed_trainer.distributed import launched_with
from fed_trainer.schedule import resolve_intervals, resolve_run_length
from fed_trainer.server_optimizer import (
    ADAPTIVE_RULES,
    DEFAULT_LEARNING_RATES,
    DEFAULT_MOMENTUM,
    MOMENTUM_RULES,
    SERVER_OPTIMIZERS,
)
from fed_trainer.server_state import SERVER_STATE_DEVICES
from fed_trainer.strategies.registry import get_strategy

PARTITION_METHODS = ("iid", "dirichlet", "shards")
CLIENT_WEIGHTINGS = ("num_examples", "uniform")
AGGREGATION_RULES = ("mean", "median", "trimmed_mean")
SERVER_DTYPES = ("float32", "model")  # the server's copy of a 16-bit model's global weights (fedavg.master_dtype)


def deepspeed_settings(deepspeed: Any) -> dict:
    """The DeepSpeed config a run uses: a `TrainingArguments.deepspeed` value (a dict or a JSON path), else an
    `accelerate launch` DeepSpeed config (which reaches the process through the environment); {} without DeepSpeed."""
    if deepspeed is None and launched_with("DEEPSPEED"):
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if deepspeed == "none":
            return {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
    if deepspeed is None:
        return {}
    if isinstance(deepspeed, str):
        with open(deepspeed, encoding="utf-8") as f:
            return json.load(f)
    return deepspeed


def deepspeed_zero_stage(deepspeed: Any) -> int:
    """The ZeRO stage a run uses (see `deepspeed_settings`); 0 without DeepSpeed."""
    stage = deepspeed_settings(deepspeed).get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


@dataclass
class FederatedConfig(TrainingArguments):
    """Training arguments for [`FederatedTrainer`].

    Every `TrainingArguments` field keeps its meaning for the *local* training of one client (optimizer,
    learning rate, batch size, ...). The fields below describe the federation. The learning-rate schedule spans
    the whole run (`num_rounds * local_steps` optimizer steps), so round `t` continues where round `t-1`
    ended; the client optimizer state (e.g. Adam moments, GaLore projectors) is fresh every round.

    Trainer's run-length and interval fields are read in rounds (`fed_trainer.schedule`): without `local_steps` and
    `local_epochs`, `max_steps` or `num_train_epochs` is spread evenly over the `num_rounds` rounds;
    `eval_strategy`/`eval_steps` and `save_strategy`/`save_steps` act at round ends (a plain script's defaults: no
    evaluation during training, a checkpoint every 500 steps and after the last round), or `eval_every_rounds` /
    `save_every_rounds` set them in rounds. `metric_for_best_model`, `load_best_model_at_end` and
    `EarlyStoppingCallback` work per evaluated round, and a round with a new best metric is checkpointed when the
    best model is kept.

    With several processes, each rank's loss is the mean over its own part of a batch and gradients (and evaluation
    losses) are averaged over ranks, DDP's rule: `average_tokens_across_devices` is turned off, because transformers
    multiplies by the number of processes the loss of every model whose forward takes `**kwargs` but whose loss
    ignores `num_items_in_batch` (sequence classifiers among them), which doubled losses and gradients on 2 ranks.
    """

    num_clients: int = field(default=10, metadata={"help": "Number of clients the training data is split into."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled (without replacement) each round; default: all clients."}
    )
    num_rounds: int = field(default=10, metadata={"help": "Number of federated rounds."})
    local_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps each client takes per round. Unset with local_epochs unset: max_steps (if set) "
            "or num_train_epochs spread over the rounds."
        },
    )
    local_epochs: float | None = field(
        default=None, metadata={"help": "Epochs over its own shard each client takes per round (instead of steps)."}
    )
    strategy: str = field(
        default="fedavg", metadata={"help": "Aggregation strategy, a name from `fed_trainer.available_strategies()`."}
    )
    strategy_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "The strategy's own options, passed to its constructor: a dict, or a JSON string on the command "
            "line, e.g. '{\"refresh_rounds\": 4}' for galore_shared (docs/methods.md lists each strategy's)."
        },
    )
    partition: str = field(
        default="iid",
        metadata={"help": "How train_dataset is split: 'iid', 'dirichlet', 'shards', or 'column:<name>'."},
    )
    partition_alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet concentration for partition='dirichlet' (smaller: more skewed)."}
    )
    partition_label_column: str = field(
        default="label", metadata={"help": "Label column used by the 'dirichlet' and 'shards' partitions."}
    )
    client_weighting: str = field(
        default="num_examples",
        metadata={"help": "Aggregation weights: 'num_examples' (p_k = n_k / sum n) or 'uniform' (p_k = 1/K)."},
    )
    eval_every_rounds: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the global model every N rounds and after the last (0: only after the last round); "
            "sets eval_strategy='epoch'. Unset: eval_strategy decides ('epoch': every round, 'steps': at the round "
            "ends reaching each multiple of eval_steps, 'no': never)."
        },
    )
    save_every_rounds: int | None = field(
        default=None,
        metadata={
            "help": "Write a round checkpoint (the merged global model and the state to resume from) to "
            "output_dir/round-N every N rounds (0: never); save_total_limit keeps the newest. Unset: save_strategy "
            "decides ('steps', the default: at the round ends reaching each multiple of save_steps and after the "
            "last round; 'epoch': every round; 'best': at each new best metric; 'no': never)."
        },
    )
    client_eval_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this share of each client's data (a seeded split) and evaluate the global model on "
            "every client's held-out part in each evaluated round: eval_client_<id>_<metric> and the clients' "
            "eval_clients_mean_/worst_/std_<metric> (or pass client_eval_datasets to the trainer)."
        },
    )
    personalization_steps: int = field(
        default=0,
        metadata={
            "help": "Also evaluate, in each evaluated round, every client's own model: N local steps from the "
            "global model on its training data (at learning_rate, constant), evaluated on its held-out set "
            "(eval_personalized_client_<id>_<metric>, eval_personalized_clients_mean_/worst_/std_<metric>); the "
            "global model is not changed. Needs client_eval_split or client_eval_datasets. 0: off."
        },
    )
    aggregation_rule: str = field(
        default="mean",
        metadata={
            "help": "How client updates are combined: 'mean' (weighted by client_weighting), 'median' "
            "(coordinate-wise) or 'trimmed_mean' (coordinate-wise, trim_fraction cut at each end); the robust "
            "rules ignore client weights. For fedavg, fedit and ffa_lora."
        },
    )
    trim_fraction: float = field(
        default=0.1, metadata={"help": "Share of clients cut at each end by aggregation_rule='trimmed_mean'."}
    )
    update_clip_norm: float | None = field(
        default=None,
        metadata={
            "help": "Clip each client's update (its change to the aggregated tensors) to this L2 norm before "
            "aggregating. For fedavg, fedit and ffa_lora."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Client-level differential privacy (DP-FedAvg): Gaussian noise of std dp_noise_multiplier * "
            "update_clip_norm is added to the sum of the clipped client updates. Needs update_clip_norm and "
            "client_weighting='uniform'; for fedavg, fedit and ffa_lora."
        },
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "The delta at which the privacy spent is reported."})
    server_dtype: str = field(
        default="float32",
        metadata={
            "help": "The dtype of the server's copy of a bfloat16/float16 model's global weights: 'float32' (a "
            "master copy: updates below the 16-bit resolution add up over rounds; messages still travel in the "
            "model's dtype) or 'model' (the model's own dtype: half the server memory, such updates are rounded "
            "away every round). The running sum and server optimizer state are float32 either way.",
            "choices": list(SERVER_DTYPES),
        },
    )
    server_state_device: str = field(
        default="auto",
        metadata={
            "help": "Where the server state (global copy, running sum, server optimizer buffers, SCAFFOLD's controls, "
            "the dense product sums of fedex_lora and lora_fair) lives: 'auto' (the training device when it and a "
            "client's training fit in 90% of its free memory, else the CPU; fed_trainer.memory_model), 'cpu' (the "
            "GPU then holds the model and one tensor in transit) or 'cuda'. Under ZeRO-3, each rank's partitions.",
            "choices": list(SERVER_STATE_DEVICES),
        },
    )
    update_compression: str = field(
        default="none",
        metadata={
            "help": "How every client payload travels: 'none', 'bf16', 'int8' (bitsandbytes' 8-bit blockwise) or "
            "'nf4' (4-bit NormalFloat, blockwise); a tensor the server sent too travels as its difference from it. "
            "The logged bytes are the compressed ones (fed_trainer.compression).",
            "choices": list(COMPRESSION_FORMATS),
        },
    )
    compression_block_size: int = field(
        default=64,
        metadata={"help": "Values per absmax scale for 'int8' and 'nf4'.", "choices": list(BLOCK_SIZES)},
    )
    compression_error_feedback: bool = field(
        default=False,
        metadata={
            "help": "Each client adds its last compression's residual to its next payload before compressing it, "
            "so what the server receives over rounds tracks the uncompressed updates."
        },
    )
    downlink_compression: str = field(
        default="none",
        metadata={
            "help": "How every server message travels: 'none', 'bf16', 'int8' or 'nf4' (as update_compression, with "
            "compression_block_size), each tensor as its difference from its value at the start of the run, which "
            "every client holds; the server applies each client's update to the exact global model. For the "
            "strategies that declare compressed_downlink (fed_trainer.compression).",
            "choices": list(COMPRESSION_FORMATS),
        },
    )
    server_optimizer: str = field(
        default="none",
        metadata={
            "help": "The server's step on each round's aggregated update: 'none' (the aggregate is the new global "
            "model), 'fedavgm', 'nesterov' (DiLoCo's outer step), 'fedadam', 'fedyogi' or 'fedadagrad' "
            "(docs/methods.md gives the formulas and which strategies take one).",
            "choices": list(SERVER_OPTIMIZERS),
        },
    )
    server_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "eta of the server optimizer; default: 1.0 for fedavgm, 0.7 for nesterov (DiLoCo), 1e-3 for the "
            "adaptive rules."
        },
    )
    server_momentum: float | None = field(
        default=None, metadata={"help": "beta of fedavgm, mu of nesterov (default 0.9)."}
    )
    server_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.99],
        metadata={"help": "beta1 and beta2 of fedadam and fedyogi (fedadagrad uses beta1 only)."},
    )
    server_epsilon: float = field(
        default=1e-6, metadata={"help": "tau of the adaptive server optimizers (v starts at tau^2)."}
    )
    proximal_mu: float = field(
        default=0.0,
        metadata={
            "help": "FedProx: each client's loss gains proximal_mu/2 ||w - w_global||^2 over its trainable weights "
            "(w_global: what it started the round from), which holds clients near the global model on skewed data. "
            "0 turns it off. Not under DeepSpeed ZeRO-3."
        },
    )
    galore_refresh_rounds: int | None = field(
        default=None, metadata={"help": "Deprecated: strategy_kwargs={'refresh_rounds': N} (galore_shared)."}
    )
    galore_average_moments: bool | None = field(
        default=None, metadata={"help": "Deprecated: strategy_kwargs={'average_moments': True} (galore_shared)."}
    )
    min_clients_per_round: int = field(
        default=1,
        metadata={
            "help": "Fewest clients whose updates a round must aggregate; a round with fewer (clients failed or "
            "were rejected) stops the run with an error after saving a checkpoint of the last finished round."
        },
    )

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "strategy_kwargs"]  # JSON strings become dicts
    # the arguments class of one client's local run: these fields, less the federated ones (see `client_training_args`)
    client_args_class = TrainingArguments
    # deprecated field -> the strategy option it stands for (the fields go in the release after next)
    _DEPRECATED_OPTIONS = {"galore_refresh_rounds": "refresh_rounds", "galore_average_moments": "average_moments"}

    @property
    def clients_sampled_per_round(self) -> int:
        """How many clients each round samples: `clients_per_round`, or every client when it is unset."""
        return self.clients_per_round or self.num_clients

    def __post_init__(self) -> None:
        self._check_galore()  # these two before TrainingArguments sets up DeepSpeed for a combination we refuse
        self._check_deepspeed()
        # TrainingArguments checks in steps that every evaluation has a checkpoint for load_best_model_at_end;
        # here a round with a new best metric is always checkpointed (schedule.keeps_best), so it is skipped
        load_best, self.load_best_model_at_end = self.load_best_model_at_end, False
        if load_best and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        super().__post_init__()
        self.load_best_model_at_end = load_best
        self.average_tokens_across_devices = False  # see the class docstring
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {self.num_clients}.")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} must be between 1 and num_clients={self.num_clients}; "
                "leave it unset to train every client each round."
            )
        if self.client_eval_split is not None and not 0 < self.client_eval_split < 1:
            raise ValueError(f"client_eval_split must be in (0, 1), got {self.client_eval_split}.")
        if self.personalization_steps < 0:
            raise ValueError(f"personalization_steps must be >= 0, got {self.personalization_steps}.")
        if self.personalization_steps and deepspeed_zero_stage(self.deepspeed) > 0:
            raise ValueError(
                "personalization_steps restores the global weights after each client's fine-tuning, which DeepSpeed "
                "ZeRO keeps in partitions: drop personalization_steps, or the DeepSpeed config."
            )
        if self.aggregation_rule not in AGGREGATION_RULES:
            raise ValueError(f"aggregation_rule must be one of {AGGREGATION_RULES}, got {self.aggregation_rule!r}.")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}.")
        if self.update_clip_norm is not None and self.update_clip_norm <= 0:
            raise ValueError(f"update_clip_norm must be positive, got {self.update_clip_norm}.")
        self._check_choices()
        self._check_privacy()
        self._check_server_optimizer()
        self._check_compression()
        if self.server_state_device == "cuda" and (self.use_cpu or not torch.cuda.is_available()):
            raise ValueError(
                "server_state_device='cuda' keeps the server state on the GPU, but this run trains on the CPU "
                "(no CUDA device, or use_cpu=True): use server_state_device='auto' or 'cpu'."
            )
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}.")
        if not 1 <= self.min_clients_per_round <= self.clients_sampled_per_round:
            raise ValueError(
                f"min_clients_per_round={self.min_clients_per_round} must be between 1 and the clients of a round "
                f"({self.clients_sampled_per_round})."
            )
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}.")
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("Set either local_steps or local_epochs, not both.")
        resolve_run_length(self)
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {self.local_steps}.")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {self.local_epochs}.")
        self._check_partition()
        if self.client_weighting not in CLIENT_WEIGHTINGS:
            raise ValueError(f"client_weighting must be one of {CLIENT_WEIGHTINGS}, got {self.client_weighting!r}.")
        resolve_intervals(self)
        self._check_strategy()
        self._check_processes()

    def _check_processes(self) -> None:
        if self.fsdp or launched_with("FSDP"):
            raise ValueError(
                "FederatedTrainer does not support FSDP: for a model that does not fit one device use DeepSpeed "
                "ZeRO-3 (recipes/accelerate/zero3.yaml); otherwise drop the FSDP config, and with several processes "
                "the rounds are client-parallel."
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1:
            raise ValueError(
                f"This process was launched as one of {launched} (WORLD_SIZE={launched}) but joined no process "
                "group, so each process would run the whole federation alone. On a machine without GPUs pass "
                "--use_cpu (use_cpu=True): the processes then talk over gloo."
            )

    def _check_deepspeed(self) -> None:
        if self.proximal_mu and deepspeed_zero_stage(self.deepspeed) == 3:
            raise ValueError(
                "proximal_mu (FedProx) is not supported under DeepSpeed ZeRO-3: its term needs the whole trainable "
                "weights in the loss, which ZeRO-3 holds only as partitions outside a module's forward. Use ZeRO-2, "
                "or set proximal_mu=0."
            )
        if "scheduler" in deepspeed_settings(self.deepspeed):
            raise ValueError(
                "The DeepSpeed config has a 'scheduler' section, which would restart the learning-rate schedule for "
                "every client; FederatedTrainer runs one schedule over the whole run (num_rounds x local_steps "
                "steps). Remove the section and set lr_scheduler_type / warmup_steps in the FederatedConfig."
            )

    def _check_partition(self) -> None:
        if self.partition.startswith("column:"):
            if not self.partition[len("column:") :]:
                raise ValueError("partition='column:<name>' needs a column name, e.g. 'column:user_id'.")
        elif self.partition not in PARTITION_METHODS:
            raise ValueError(
                f"partition must be one of {PARTITION_METHODS} or 'column:<name>', got {self.partition!r}."
            )
        if self.partition_alpha <= 0:
            raise ValueError(f"partition_alpha must be positive, got {self.partition_alpha}.")

    def _check_privacy(self) -> None:
        if self.dp_noise_multiplier is None:
            return
        if self.dp_noise_multiplier < 0 or not 0 < self.dp_delta < 1:
            raise ValueError("dp_noise_multiplier must be >= 0 and dp_delta in (0, 1).")
        if self.update_clip_norm is None:
            raise ValueError(
                "dp_noise_multiplier needs update_clip_norm: the noise is calibrated to the clipped update norm."
            )
        if self.client_weighting != "uniform" or self.aggregation_rule != "mean":
            raise ValueError(
                "DP-FedAvg needs client_weighting='uniform' and aggregation_rule='mean': with example-count weights "
                "one client's influence, and so the noise needed, is unbounded."
            )

    def _check_choices(self) -> None:
        """Every field of this class that declares its `choices` (the command line enforces them too) holds one of
        them, also when the config is built in Python."""
        for name in FederatedConfig.__annotations__:  # this class's own fields, not TrainingArguments'
            choices = self.__dataclass_fields__[name].metadata.get("choices")
            if choices is not None and getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}.")

    def _check_compression(self) -> None:
        if self.update_compression == "none" and self.compression_error_feedback:
            raise ValueError("compression_error_feedback needs update_compression ('bf16', 'int8' or 'nf4').")
        for name in ("update_compression", "downlink_compression"):
            if getattr(self, name) != "none" and deepspeed_zero_stage(self.deepspeed) > 0:
                raise ValueError(
                    f"{name} under DeepSpeed ZeRO is not supported (the tensors are partitions): drop {name}, or "
                    "the DeepSpeed config."
                )

    def _check_server_optimizer(self) -> None:
        rule = self.server_optimizer
        if rule == "none":
            if self.server_learning_rate is not None or self.server_momentum is not None:
                raise ValueError(
                    "server_learning_rate and server_momentum set the server optimizer's step, but "
                    "server_optimizer='none': choose one of " + repr(SERVER_OPTIMIZERS[1:]) + "."
                )
            return
        if self.server_momentum is not None and rule not in MOMENTUM_RULES:
            raise ValueError(
                f"server_momentum is the momentum of {MOMENTUM_RULES}; {rule!r} takes server_betas instead."
            )
        if self.server_learning_rate is None:
            self.server_learning_rate = DEFAULT_LEARNING_RATES[rule]
        if self.server_momentum is None and rule in MOMENTUM_RULES:
            self.server_momentum = DEFAULT_MOMENTUM
        self.server_betas = [float(b) for b in self.server_betas]
        if self.server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be positive, got {self.server_learning_rate}.")
        if rule in MOMENTUM_RULES and not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}.")
        if rule in ADAPTIVE_RULES and (len(self.server_betas) != 2 or not all(0 <= b < 1 for b in self.server_betas)):
            raise ValueError(f"server_betas must be two numbers in [0, 1), got {self.server_betas}.")
        if self.server_epsilon <= 0:
            raise ValueError(f"server_epsilon must be positive, got {self.server_epsilon}.")

    def _check_strategy(self) -> None:
        """Take the deprecated option fields into `strategy_kwargs`, then build the strategy once, so that an
        unknown name or a bad option fails here and not when the trainer is built."""
        self.strategy_kwargs = dict(self.strategy_kwargs or {})
        for old, option in self._DEPRECATED_OPTIONS.items():
            value = getattr(self, old)
            if value is not None:
                warnings.warn(
                    f"FederatedConfig.{old} is deprecated and goes in the release after next: pass "
                    f"strategy_kwargs={{{option!r}: {value!r}}} instead.",
                    FutureWarning,
                    stacklevel=4,
                )
                self.strategy_kwargs.setdefault(option, value)
        get_strategy(self.strategy, **self.strategy_kwargs)

    def _check_galore(self) -> None:
        optim = str(getattr(self.optim, "value", self.optim))
        if "galore" not in optim:
            return
        if deepspeed_zero_stage(self.deepspeed) >= 1:
            raise ValueError(
                "GaLore does not work under DeepSpeed ZeRO (its projector would see flattened 1-D partitions). "
                "Drop the deepspeed config to train GaLore clients, or keep ZeRO and use optim='adamw_torch'."
            )
        if optim == "galore_adamw_8bit" and (self.use_cpu or not torch.cuda.is_available()):
            raise ValueError(
                "optim='galore_adamw_8bit' needs a CUDA device: galore_torch's GaLoreAdamW8bit calls "
                "torch.cuda.synchronize() in every step, so a CPU client fails at its first step. Use "
                "optim='galore_adamw' on CPUs."
            )
        if optim.endswith("layerwise"):
            raise ValueError(
                f"optim={optim!r} (layer-wise GaLore) is not supported for federated clients: it attaches optimizer "
                "hooks to the shared model, refuses gradient accumulation and DDP, and keeps a per-parameter "
                "schedule that cannot continue across rounds. Use optim='galore_adamw' instead."
            )
