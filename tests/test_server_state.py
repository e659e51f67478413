"""Where the server state lives (`server_state_device`) and how much of it there is (`fed_trainer.memory_model`):
the placement rule, the refusal of a GPU placement on a CPU run, and the memory model's byte counts against the
tensors the strategies really hold after a round. (This machine has no GPU: the copies between a CPU state and a
GPU model run in bench/gpu_check.sh's `fedavg_bf16_state_cpu` and `zero3_1proc`.)"""

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.memory_model import client_training_bytes, server_state_bytes, tensor_values
from fed_trainer.server_state import OnDevice, state_device
from fed_trainer.strategies.registry import get_strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from memory import allocated_tensor_bytes  # noqa: E402

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # (a device object needs no GPU)


def test_auto_keeps_the_state_on_the_gpu_only_while_it_and_a_client_fit_in_nine_tenths_of_free_memory():
    assert state_device("auto", GPU, 50, 40, free_bytes=100) == GPU  # 90 bytes of 100 free
    assert state_device("auto", GPU, 51, 40, free_bytes=100) == CPU
    assert state_device("cpu", GPU, 1, 1, free_bytes=100) == CPU
    assert state_device("cuda", GPU, 10**12, 0, free_bytes=100) == GPU  # asked for: the user's call
    assert state_device("auto", CPU, 1, 1) == CPU


def test_a_gpu_placement_on_a_cpu_run_is_refused_with_the_fix(make_config):
    with pytest.raises(ValueError, match="server_state_device='auto' or 'cpu'"):
        make_config(server_state_device="cuda")
    with pytest.raises(ValueError, match="server_state_device must be one of"):
        make_config(server_state_device="gpu")


def test_a_view_on_the_tensors_own_device_hands_out_the_tensors_themselves():
    tensors = {"w": torch.ones(3), "b": torch.zeros(2)}
    view = OnDevice(tensors, CPU)
    assert list(view) == ["w", "b"] and len(view) == 2 and view["w"] is tensors["w"]


def held_bytes(strategy) -> int:
    """Bytes of every tensor the strategy holds as server state after a round, counted from the tensors."""
    groups = [strategy.global_state, strategy._sum, strategy.downlink_reference]
    if strategy.server_optimizer is not None:
        groups += list(strategy.server_optimizer.state.values())
    if strategy.name == "scaffold":
        groups += [strategy.control, strategy._control_sum]
    return sum(t.numel() * t.element_size() for group in groups for t in group.values())


@pytest.mark.parametrize(
    "strategy, server_optimizer, dtype, server_dtype, downlink",
    [
        ("fedavg", "none", torch.float32, "float32", "none"),
        ("fedavg", "fedadam", torch.float32, "float32", "none"),
        ("fedavg", "fedavgm", torch.bfloat16, "float32", "none"),
        ("fedavg", "fedyogi", torch.bfloat16, "model", "none"),
        ("scaffold", "none", torch.float32, "float32", "none"),
        ("fedavg", "none", torch.bfloat16, "float32", "int8"),
    ],
)
def test_the_memory_model_counts_the_server_state_a_round_leaves(make_config, strategy, server_optimizer, dtype,
                                                                  server_dtype, downlink):  # fmt: skip
    args = make_config(num_clients=2, strategy=strategy, server_optimizer=server_optimizer, server_dtype=server_dtype,
                       server_state_device="cpu", optim="sgd", downlink_compression=downlink)  # fmt: skip
    clients = [toy_dataset(8, seed) for seed in range(2)]
    trainer = FederatedTrainer(model=tiny_bert().to(dtype), client_datasets=clients, args=args)
    trainer.train()
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    predicted = server_state_bytes(sum(p.numel() for p in trained), trained[0].element_size(), strategy=strategy,
                                   server_optimizer=server_optimizer, server_dtype=server_dtype,
                                   downlink_reference=downlink != "none")  # fmt: skip
    assert held_bytes(trainer.strategy) == predicted
    assert {t.device for t in trainer.strategy.global_state.values()} == {CPU}


def test_the_memory_model_counts_fed_sbs_round_0_gradient_sum_at_its_peak(make_config):
    """Fed-SB's round 0 (LoRA-SB's initialisation) sums the clients' float32 gradients of every targeted base weight:
    the largest server state of the run, which "auto" must size; from round 1 on only R and the heads are kept."""
    args = make_config(num_clients=2, strategy="fed_sb", server_state_device="cpu", optim="sgd")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(model=tiny_bert(), client_datasets=[toy_dataset(8, seed) for seed in range(2)],
                               peft_config=lora, args=args)  # fmt: skip
    strategy, held = trainer.strategy, []
    finish_round = strategy.finish_round

    def measured_finish_round(model):  # the state as the round's last payload has been summed
        held.append(held_bytes(strategy))
        finish_round(model)

    strategy.finish_round = measured_finish_round
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    targeted = sum(layer.get_base_layer().weight.numel() for layer in strategy.layers.values())
    assert targeted == 2 * 2 * 32 * 32  # query and value of two 32-wide layers
    assert held[0] == 4 * (trainable + targeted)  # the float32 global R and heads, and the sum of gradients
    predicted = [server_state_bytes(trainable, 4, strategy="fed_sb", gradient_values=targeted)]
    assert held == predicted + [server_state_bytes(trainable, 4, strategy="fed_sb")] * 2


def test_client_training_bytes_follow_adamw_and_the_zero_stages():
    params, trainable = 1000, 100
    assert client_training_bytes(params, trainable, 2) == 2 * 1000 + 2 * 100 * 3  # weights, gradients, 2 moments
    assert client_training_bytes(params, trainable, 2, optim="sgd") == 2 * 1000 + 2 * 100
    # ZeRO (arXiv 1910.02054, Figure 1): 2P + 2T + 12T/N, 2P + 14T/N, 16-bit weights partitioned too at stage 3
    assert client_training_bytes(params, trainable, 2, zero_stage=1, ranks=4) == 2000 + 200 + 1200 // 4
    assert client_training_bytes(params, trainable, 2, zero_stage=2, ranks=4) == 2000 + 1400 // 4
    assert client_training_bytes(params, trainable, 2, zero_stage=3, ranks=4) == (2000 + 1400) // 4


def test_adamws_step_holds_every_value_at_once_on_cuda_and_two_of_the_largest_tensor_on_the_cpu():
    """torch's multi-tensor AdamW (its default on CUDA) takes sqrt(v) of every value at once; its per-tensor loop (the
    CPU's) a tensor's sqrt and quotient; the fused kernel and SGD none; a tied weight's two gradients are summed out
    of place (2E) whatever the optimizer, and the larger of the two counts."""
    base = client_training_bytes(1000, 100, 2, optim="adamw_torch_fused", largest=40, device_type="cpu")
    assert base == 2 * 1000 + 2 * 100 * 3
    unfused = dict(optim="adamw_torch", largest=40)
    assert client_training_bytes(1000, 100, 2, **unfused, device_type="cuda") == base + 2 * 100
    assert client_training_bytes(1000, 100, 2, **unfused, device_type="cpu") == base + 2 * 2 * 40
    assert client_training_bytes(1000, 100, 2, **unfused, tied=30, device_type="cpu") == base + 2 * 2 * 40
    assert client_training_bytes(1000, 100, 2, **unfused, tied=60, device_type="cpu") == base + 2 * 2 * 60
    assert client_training_bytes(1000, 100, 2, optim="sgd", largest=40, tied=30) == 2 * 1000 + 2 * 100 + 2 * 2 * 30


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    """A one-layer Llama whose embeddings (8192 x 128) are most of its 1.2M parameters, so that a batch's activations
    (4 tokens) are small beside the weights' transients."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_the_memory_model_counts_a_rounds_tensors_at_their_peak_on_the_cpu(make_config, tied, optim):
    """The bytes of the CPU tensors a run allocates (torch's profiler: the allocator's count), at their peak and after
    the run, against the memory model: a float32 FedAvg round of two clients, the second training beside the state
    and the first's payload summed; the peak is the step's or the tied gradients' transient (see the test above)."""
    model = tiny_llama(tied)
    ids = torch.randint(0, 8192, (8, 4), generator=torch.Generator().manual_seed(0)).tolist()
    clients = [Dataset.from_dict({"input_ids": ids[i::2], "labels": ids[i::2]}) for i in range(2)]
    args = make_config(num_clients=2, num_rounds=1, local_steps=2, per_device_train_batch_size=1, optim=optim,
                       server_state_device="cpu")  # fmt: skip
    with allocated_tensor_bytes() as allocated:
        trainer = FederatedTrainer(model=model, client_datasets=clients, args=args)
        trainer.train()
    params = sum(p.numel() for p in model.parameters())
    largest, tied_values = tensor_values(model)
    assert tied_values == (8192 * 128 if tied else 0)
    state = server_state_bytes(params, 4)
    training = client_training_bytes(params, params, 4, optim=optim, largest=largest, tied=tied_values,
                                     device_type="cpu") - 4 * params  # the weights were there before  # fmt: skip
    assert abs(allocated["final"] - state) < 2**16  # the state, and a few small tensors (RNG states, step counts)
    untransient = client_training_bytes(params, params, 4, optim=optim, device_type="cpu") - 4 * params
    assert training - untransient == 4 * 2 * 8192 * 128 * (tied or optim == "adamw_torch")
    assert 0 <= allocated["peak"] - (state + training) < 2**18  # 4 tokens' activations: not modelled


class ClientStart(FederatedCallback):
    """Whether any tensor of the client's message was still alive as each client started training."""

    def __init__(self, sent: list) -> None:
        self.sent, self.alive = sent, []

    def on_client_begin(self, args, state, control, **kwargs):
        self.alive.append(any(ref() is not None for ref in self.sent[-1]))


def test_a_16_bit_models_message_is_let_go_of_once_its_client_has_loaded_it(make_config):
    """A bfloat16 model's message is a cast copy of the float32 master (2 bytes a value, a model's size): it must not
    stay beside the client's weights, gradients and optimizer through its training."""
    args = make_config(num_clients=2, num_rounds=1, server_state_device="cpu", optim="sgd")
    trainer = FederatedTrainer(model=tiny_bert().to(torch.bfloat16), args=args,
                               client_datasets=[toy_dataset(8, seed) for seed in range(2)])  # fmt: skip
    strategy, sent = trainer.strategy, []
    server_message = strategy.server_message

    def recorded_message(client_id):
        message = server_message(client_id)
        sent.append([weakref.ref(t) for t in message.values() if t.dtype == torch.bfloat16])  # the casts
        return message

    strategy.server_message = recorded_message
    starts = ClientStart(sent)
    trainer.add_callback(starts)
    trainer.train()
    assert all(sent) and starts.alive == [False, False]


class OptimizerRefs(FederatedCallback):
    """Weak references to every client's optimizer, and which were still alive when each round ended."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.alive_at_round_end: list[bool] = []

    def on_client_end(self, args, state, control, optimizer=None, **kwargs):
        self.refs.append(weakref.ref(optimizer))

    def on_round_end(self, args, state, control, **kwargs):
        self.alive_at_round_end += [ref() is not None for ref in self.refs]


def test_no_client_optimizer_outlives_its_client_into_the_aggregation(make_config):
    refs = OptimizerRefs()
    clients = [toy_dataset(8, seed) for seed in range(2)]
    trainer = FederatedTrainer(model=tiny_bert(), client_datasets=clients, callbacks=[refs],
                               args=make_config(num_clients=2, num_rounds=2))  # fmt: skip
    trainer.train()
    assert len(refs.refs) == 4 and refs.alive_at_round_end == [False] * 6  # 2 after round 1, 4 after round 2


class Cycle:
    """An object that only the garbage collector frees (it refers to itself)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.me, self.tensor = self, tensor


def test_a_measure_of_allocated_tensors_counts_no_free_of_garbage_left_from_before():
    """A tensor allocated under an earlier measure, in a cycle that became garbage before this one: had the collector
    freed it inside this measure (it may run at any allocation), its 512 bytes would come off this one's count (seen
    in CI: a test two measures apart by 512 bytes)."""
    with allocated_tensor_bytes():
        left = Cycle(torch.ones(128))
    del left
    with allocated_tensor_bytes() as allocated:
        kept = torch.ones(10)
        gc.collect()
    assert allocated == {"final": 40, "peak": 40} and kept.numel() == 10


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora"])
def test_under_zero3_the_strategy_copies_nothing_of_the_model_before_zero_partitions_it(make_config, strategy):
    """Under ZeRO-3 the client trainer's engine partitions the model after the strategy's setup (a model not loaded
    under zero.Init is whole until then): setup then copies none of it, and the strategy takes its state from the
    partitions (`on_model_sharded`; the ZeRO-3 runs of tests/test_zero.py end where one process ends). Without
    DeepSpeed setup takes the float32 global copy of the trainable weights, and FlexLoRA the base weights it folds
    updates into."""
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    allocated, kept = {}, []
    for stage in (0, 3):
        args = make_config(strategy=strategy)
        args.deepspeed = {"zero_optimization": {"stage": stage}} if stage else None  # (set after the config's checks)
        server, model = get_strategy(strategy), tiny_bert()
        kept.append(server)  # (what it holds stays alive, and is not let go of in the next measure)
        with allocated_tensor_bytes() as allocated[stage]:
            model = server.setup(model, args, {0: peft} if strategy == "flexlora" else None)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    based = sum(w.numel() for n, w in model.named_parameters() if n.endswith("base_layer.weight"))  # FlexLoRA's
    assert allocated[0]["final"] - allocated[3]["final"] == 4 * (trainable + based)
