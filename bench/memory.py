"""Memory of federated runs, four measurements:

- default: peak RSS against the number of clients, 4 clients against 32 on the same total data. Each configuration
  runs in its own process (peak RSS is per process) for one round of `--steps` local steps per client; the
  processes alternate over repeats and the median peak RSS is reported (target: ratio at most 1.10).
  (The bundled MiniLM on BBC News.)
- `--rounds N`: no leak across rounds under DeepSpeed ZeRO-3 (MiniLM). `--processes` processes (torchrun, gloo on CPU)
  train every client together on the sharded model for N rounds; each records its RSS after every round. The
  ratio is RSS after round N over RSS after round 1, the largest over the processes, median over repeats (target:
  at most 1.05; an engine rebuilt per client grows it round after round).

- `--llm`: one client of the bundled SmolLM2-135M training `--steps` steps on chatterbot-corpus text cut into blocks
  of `--seq-len` tokens, at the same batch size, under full fine-tuning (fedavg), GaLore (fedavg with galore_adamw),
  LoRA (fedit, r 16 on every linear layer), and the same LoRA on an 8-bit and on a 4-bit nf4 base (bitsandbytes).
  Each runs in its own process, whose RSS high-water mark is reset (`/proc/self/clear_refs`) after the imports and
  again once the model is loaded and held in memory of its own (`materialize`): the peak of loading and the peak of
  training are reported apart, beside the imports' baseline. Reported: the medians, the training peak
  above that baseline as a ratio to full fine-tuning's, and the bytes one client sends per round. On a CPU, compute
  runs in float32 and a quantized layer is dequantized for every product. The children run with a fixed glibc mmap
  threshold (`FIXED_MMAP`), so that freed transient buffers leave the RSS (`--glibc-default-malloc`: not).
- `--server-state`: the memory model (`fed_trainer.memory_model`) against measured memory: MiniLM and SmolLM2-135M
  in float32 under fedavg, fedavg + fedadam and scaffold, 2 rounds of 2 clients with `server_state_device="cpu"`,
  each in its own process (`FIXED_MMAP`); the memory above the loaded model after the run (the server state, and
  what else the run keeps) and at the peak, against `server_state_bytes` (with every client's `client_state_bytes`)
  and that plus `client_training_bytes` (without the weights, which are loaded) and the new client state of the
  round's clients trained before the last; and FedAdam's buffers alone (its run minus fedavg's). Measured two ways:
  the process's RSS (median over `--repeats`), and, in one more run each, the bytes of the CPU tensors the run
  allocated (`allocated_tensor_bytes`: the allocator's own count, the same in every run, without the process's
  other memory, as `torch.cuda.max_memory_allocated` counts a GPU's).

    python bench/memory.py --repeats 3 --json bench/results/memory.json
    python bench/memory.py --rounds 10 --repeats 3 --json bench/results/memory_rounds.json
    python bench/memory.py --llm --seq-len 128 --batch-size 4 --steps 4 --json bench/results/memory_llm.json
    python bench/memory.py --server-state --seq-len 32 --batch-size 2 --examples 64 \\
        --json bench/results/memory_state.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from common import current_rss_mib, launcher, median, minilm_and_data, parser, report

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer

ZERO3 = str(Path(__file__).parent.parent / "recipes" / "deepspeed" / "zero3.json")


class RoundRSS(FederatedCallback):
    """The process's RSS (MiB) after every round, once the new global model is in place."""

    def __init__(self) -> None:
        self.mib: list[float] = []

    def on_round_end(self, args, state, control, **kwargs):
        self.mib.append(current_rss_mib())


def child(a) -> None:
    """One run (one process of it under torchrun); prints its peak RSS, or writes its RSS per round."""
    from fed_trainer.distributed import end_process_group

    model, data, collator = minilm_and_data(a.examples, a.seq_len)
    recorder = RoundRSS()
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(
            output_dir=out, num_clients=a.child, num_rounds=a.rounds or 1, local_steps=a.steps,
            per_device_train_batch_size=a.batch_size, report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_pin_memory=False, seed=0, deepspeed=a.deepspeed, save_strategy="no",
        )  # fmt: skip
        trainer = FederatedTrainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[recorder]
        )
        trainer.train()
    if a.worker_out:
        Path(f"{a.worker_out}.rank{trainer.args.process_index}").write_text(json.dumps(recorder.mib))
    else:
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    end_process_group()


def run_child(a, clients: int, processes: int = 1, extra: tuple = (), env: dict | None = None) -> str:
    cmd = [*launcher(processes), __file__, "--child", str(clients), "--steps", str(a.steps), *extra]
    cmd += ["--examples", str(a.examples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)), **(env or {}))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def clients_main(a) -> None:
    rows = []
    for repeat in range(a.repeats):
        for clients in (a.few, a.many):
            peak = json.loads(run_child(a, clients).strip().splitlines()[-1])["peak_rss_mib"]
            rows.append({"repeat": repeat, "clients": clients, "peak_rss_mib": peak})
    few = median([r["peak_rss_mib"] for r in rows if r["clients"] == a.few])
    many = median([r["peak_rss_mib"] for r in rows if r["clients"] == a.many])
    summary = {
        "examples_in_total": a.examples,
        f"median_peak_rss_mib_{a.few}_clients": few,
        f"median_peak_rss_mib_{a.many}_clients": many,
        "ratio": many / few,
        "target_ratio": 1.10,
    }
    report(f"Peak RSS, {a.few} vs {a.many} clients (MiniLM, BBC News)", rows, summary, a.json)


def rounds_main(a) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(a.repeats):
            out = f"{directory}/run{repeat}"
            extra = ("--rounds", str(a.rounds), "--deepspeed", a.deepspeed, "--worker-out", out)
            run_child(a, a.few, a.processes, extra)
            for rank in range(a.processes):
                mib = json.loads(Path(f"{out}.rank{rank}").read_text())
                rows.append({"repeat": repeat, "rank": rank, "rss_mib_round_1": mib[0],
                             f"rss_mib_round_{a.rounds}": mib[-1], "ratio": mib[-1] / mib[0]})  # fmt: skip
    summary = {
        "work": f"MiniLM fedavg, {a.few} clients x {a.steps} steps x batch {a.batch_size} per round per process",
        "deepspeed": a.deepspeed,
        "median_ratio": median([max(r["ratio"] for r in rows if r["repeat"] == k) for k in range(a.repeats)]),
        "target_ratio": 1.05,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    title = f"RSS after round 1 and round {a.rounds}, {a.processes} processes under DeepSpeed ZeRO-3"
    report(title, rows, summary, a.json)


# what each --llm client trains with: FederatedConfig fields, and the LoRA / quantization of its model
LLM_CLIENTS = {
    "full": dict(args=dict(strategy="fedavg")),
    "galore": dict(
        args=dict(
            strategy="fedavg",
            optim="galore_adamw",
            optim_target_modules=["self_attn", "mlp"],
            optim_args="rank=64,update_proj_gap=20,scale=0.25",
        )
    ),  # fmt: skip
    "lora": dict(args=dict(strategy="fedit"), lora=True),
    "lora_8bit": dict(args=dict(strategy="fedit"), lora=True, quantization=dict(load_in_8bit=True)),
    "lora_4bit": dict(
        args=dict(strategy="fedit"),
        lora=True,
        quantization=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    ),
}


# glibc serves a large allocation from an mmap of its own, returned when freed, until frees raise that threshold
# (up to 32 MiB): then the transient buffers of training stay in the heap and count in the RSS peak. A fixed
# threshold keeps the peak the memory in use, as a GPU's allocated-memory peak is (--glibc-default-malloc: not so).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_rss_mib() -> float:
    """The process's RSS high-water mark (VmHWM) in MiB, since the start or the last `reset_peak_rss`."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def materialize(model: torch.nn.Module) -> None:
    """Copy the model's unquantized weights out of the checkpoint's memory map into memory of their own, and give
    back what loading freed (`malloc_trim`): a quantized model's float32 embeddings would otherwise keep the whole
    float32 checkpoint mapped (and counted in RSS), and a float32 model's untouched pages would not be counted yet."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor) in (torch.nn.Parameter, torch.Tensor):  # not bitsandbytes' quantized parameters
            tensor.data = tensor.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def chatterbot_blocks(tokenizer, seq_len: int, count: int):
    """`count` blocks of `seq_len` tokens of the chatterbot-corpus questions and answers, run together (labels =
    inputs), as transformers' run_clm.py groups texts."""
    from datasets import Dataset

    from fed_trainer.assets import load_chatterbot_qa

    pairs = load_chatterbot_qa(seed=0)["train"]
    ids = []
    for question, answer in zip(pairs["question"], pairs["answer"]):
        ids += tokenizer(f"{question} {answer}")["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= seq_len * count:
            break
    blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def llm_child(a) -> None:
    """One SmolLM2 client of `LLM_CLIENTS[a.llm_child]`: prints its RSS figures and uplink bytes."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fed_trainer.assets import smollm2_path

    spec = LLM_CLIENTS[a.llm_child]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    data = chatterbot_blocks(tokenizer, a.seq_len, a.steps * a.batch_size)
    imports = current_rss_mib()
    reset_peak_rss()
    quantization = spec.get("quantization")
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path(), dtype=torch.float32,
        **(dict(quantization_config=BitsAndBytesConfig(**quantization), device_map="cpu") if quantization else {}),
    )  # fmt: skip
    load_peak = peak_rss_mib()
    materialize(model)
    loaded = current_rss_mib()
    reset_peak_rss()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(
            output_dir=out, num_clients=1, num_rounds=1, local_steps=a.steps, per_device_train_batch_size=a.batch_size,
            learning_rate=1e-4, report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
            seed=0, save_strategy="no", **spec["args"],
        )  # fmt: skip
        trainer = FederatedTrainer(
            model=model, args=args, client_datasets=[data], peft_config=lora if spec.get("lora") else None
        )
        trainer.train()
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    print(json.dumps({
        "imports_rss_mib": imports, "load_peak_rss_mib": load_peak, "model_rss_mib": loaded,
        "train_peak_rss_mib": peak_rss_mib(),
        "bytes_up_per_round": rounds[0]["bytes_up"], "train_loss": rounds[0]["loss"],
    }))  # fmt: skip


def llm_main(a) -> None:
    runs = []
    for repeat in range(a.repeats):
        for name in LLM_CLIENTS:
            out = run_child(a, 1, extra=("--llm-child", name), env=None if a.glibc_default_malloc else FIXED_MMAP)
            result = json.loads(out.strip().splitlines()[-1])
            runs.append({"repeat": repeat, "client": name, **result})
    rows = []
    for name in LLM_CLIENTS:
        mine = [r for r in runs if r["client"] == name]
        rows.append({
            "client": name,
            "model_mib": median([r["model_rss_mib"] - r["imports_rss_mib"] for r in mine]),
            "train_peak_mib": median([r["train_peak_rss_mib"] - r["imports_rss_mib"] for r in mine]),
            "load_peak_mib": median([r["load_peak_rss_mib"] - r["imports_rss_mib"] for r in mine]),
            "bytes_up_per_round": mine[0]["bytes_up_per_round"],
        })  # fmt: skip
    full = rows[0]
    for row in rows:
        row["train_peak_ratio"] = row["train_peak_mib"] / full["train_peak_mib"]
        row["bytes_up_ratio"] = row["bytes_up_per_round"] / full["bytes_up_per_round"]
    summary = {
        "work": f"one SmolLM2-135M client, {a.steps} steps x batch {a.batch_size} x {a.seq_len} tokens, float32, CPU",
        "memory": "MiB above the imports' RSS (median over runs), ratios to full fine-tuning",
        "imports_rss_mib": median([r["imports_rss_mib"] for r in runs]),
        "malloc": "glibc defaults" if a.glibc_default_malloc else f"glibc with {FIXED_MMAP}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report("Memory and uplink of one SmolLM2-135M client", rows, summary, a.json, runs)


# --server-state: (model, strategy, server optimizer) of each run whose server state the memory model predicts
STATE_RUNS = [
    ("minilm", "fedavg", "none"),
    ("minilm", "fedavg", "fedadam"),
    ("minilm", "scaffold", "none"),
    ("smollm2", "fedavg", "none"),
    ("smollm2", "fedavg", "fedadam"),
    ("smollm2", "scaffold", "none"),
]


@contextmanager
def allocated_tensor_bytes():
    """Yields a dict that holds, once the block ends, the bytes of the CPU tensors allocated in the block that are
    still alive (`final`) and the most alive at once (`peak`): the CPU allocator's own count, as torch's profiler
    records it (`profile_memory`), without the process's other memory (Python objects, libraries, the allocator's
    free pages), as `torch.cuda.max_memory_allocated` counts a GPU's.

    Garbage left from before the block is collected first: the profiler counts the free of any tensor allocated
    while it ran before, so a cycle collected inside the block would take its tensors off the block's count."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    counts: dict[str, int] = {}
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield counts
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted((e for e in events if e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    counts.update(final=total, peak=peak)


MEASURES = ("rss", "tensors")  # what state_child measures: the process's RSS, or its tensors' bytes
KINDS = ("state", "peak")  # when: after the run, and at the peak


def state_child(a) -> None:
    """One run of `STATE_RUNS[a.state_child]`: 2 rounds of 2 clients on the CPU; prints the memory it added above the
    loaded model, after the run (the server state and what else outlives a round) and at its peak (during a client's
    training in round 2, with the state of round 1 in place), beside the memory model's predictions: the RSS, or
    with `--tensors` the bytes of the tensors (`allocated_tensor_bytes`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fed_trainer.assets import smollm2_path
    from fed_trainer.memory_model import client_state_bytes, client_training_bytes, server_state_bytes, tensor_values

    name, strategy, server_optimizer = STATE_RUNS[a.state_child]
    if name == "minilm":
        model, data, collator = minilm_and_data(a.examples, a.seq_len)
    else:
        data = chatterbot_blocks(AutoTokenizer.from_pretrained(smollm2_path()), a.seq_len, 4 * a.batch_size)
        model, collator = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32), None
    materialize(model)
    loaded = current_rss_mib()
    reset_peak_rss()
    optim = "sgd" if strategy == "scaffold" else "adamw_torch"
    with tempfile.TemporaryDirectory() as out, allocated_tensor_bytes() if a.tensors else nullcontext() as tensors:
        args = FederatedConfig(
            output_dir=out, num_clients=2, num_rounds=2, local_steps=2, per_device_train_batch_size=a.batch_size,
            learning_rate=1e-4, report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
            seed=0, save_strategy="no", strategy=strategy, server_optimizer=server_optimizer, optim=optim,
            server_state_device="cpu",
        )  # fmt: skip
        trainer = FederatedTrainer(model=model, args=args, client_datasets=[data.shard(2, 0), data.shard(2, 1)],
                                   data_collator=collator)  # fmt: skip
        trainer.train()
    if a.tensors:
        state_mib, peak_mib = tensors["final"] / 2**20, tensors["peak"] / 2**20
    else:
        state_mib, peak_mib = current_rss_mib() - loaded, peak_rss_mib() - loaded
    params = sum(p.numel() for p in model.parameters())
    state = server_state_bytes(params, 4, strategy=strategy, server_optimizer=server_optimizer)
    state = (state + args.num_clients * client_state_bytes(params, strategy)) / 2**20
    largest, tied = tensor_values(model)
    training = client_training_bytes(params, params, 4, optim=optim, strategy=strategy, largest=largest, tied=tied,
                                     device_type="cpu") - 4 * params  # (the weights are loaded)  # fmt: skip
    # the peak is the round's last client's training: the clients trained before it in the round have their new state
    earlier_clients = (args.clients_sampled_per_round - 1) * client_state_bytes(params, strategy)
    peak_extra = (training + earlier_clients) / 2**20
    print(json.dumps({"model": name, "strategy": strategy, "server_optimizer": server_optimizer, "params": params,
                      "measure": "tensors" if a.tensors else "rss", "state_mib": state_mib, "peak_mib": peak_mib,
                      "predicted_state_mib": state, "predicted_peak_mib": state + peak_extra}))  # fmt: skip


def state_main(a) -> None:
    runs = []
    for repeat in range(a.repeats):
        for index in range(len(STATE_RUNS)):
            out = run_child(a, 1, extra=("--state-child", str(index)), env=FIXED_MMAP)
            runs.append({"repeat": repeat, **json.loads(out.strip().splitlines()[-1])})
    for index in range(len(STATE_RUNS)):  # once: the allocator's count is the same in every run
        out = run_child(a, 1, extra=("--state-child", str(index), "--tensors"), env=FIXED_MMAP)
        runs.append({"repeat": 0, **json.loads(out.strip().splitlines()[-1])})
    rows = []
    for name, strategy, server_optimizer in STATE_RUNS:
        mine = [r for r in runs if (r["model"], r["strategy"], r["server_optimizer"]) == (name, strategy,
                                                                                        server_optimizer)]  # fmt: skip
        row = {"model": name, "strategy": strategy, "server_optimizer": server_optimizer, "params": mine[0]["params"]}
        for kind in KINDS:
            measured = {m: median([r[f"{kind}_mib"] for r in mine if r["measure"] == m]) for m in MEASURES}
            predicted = mine[0][f"predicted_{kind}_mib"]
            row.update({f"{kind}_{m}_mib": measured[m] for m in MEASURES})
            row[f"predicted_{kind}_mib"] = predicted
            row.update({f"{kind}_{m}_ratio": measured[m] / predicted for m in MEASURES})
        rows.append(row)
    by_run = {(r["model"], r["strategy"], r["server_optimizer"]): r for r in rows}
    for name in ("minilm", "smollm2"):  # FedAdam's two buffers alone: what the run keeps besides cancels out
        adam, plain = by_run[(name, "fedavg", "fedadam")], by_run[(name, "fedavg", "none")]
        row = {"model": name, "strategy": "fedavg", "server_optimizer": "fedadam minus none", "params": adam["params"]}
        predicted = adam["predicted_state_mib"] - plain["predicted_state_mib"]
        row.update({f"state_{m}_mib": adam[f"state_{m}_mib"] - plain[f"state_{m}_mib"] for m in MEASURES})
        row["predicted_state_mib"] = predicted
        row.update({f"state_{m}_ratio": row[f"state_{m}_mib"] / predicted for m in MEASURES})
        rows.append({**row, **{key: "-" for key in rows[0] if key.startswith("peak") or key == "predicted_peak_mib"}})
    measured_rows = [r for r in rows if r["peak_rss_ratio"] != "-"]
    summary = {
        "work": f"2 rounds x 2 clients x 2 steps, batch {a.batch_size} x {a.seq_len} tokens, float32, CPU, "
        "server_state_device='cpu'",
        "memory": "MiB above the loaded model after the run (state) and at the peak: the RSS (median over runs), and "
        "the CPU tensors allocated (torch's profiler, one run)",
        "predicted": "fed_trainer.memory_model: server_state_bytes (+ client_state_bytes per client); + "
        "client_training_bytes without the weights, + client_state_bytes per client trained before the round's last",
        **{
            f"largest_deviation_{m}": max(abs(r[f"{k}_{m}_ratio"] - 1) for r in measured_rows for k in KINDS)
            for m in MEASURES
        },  # fmt: skip
        "malloc": f"glibc with {FIXED_MMAP}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report("Server state and peak: measured against the memory model", rows, summary, a.json, runs)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--few", type=int, default=4, help="clients of the small run (and of the --rounds runs)")
    p.add_argument("--many", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--rounds", type=int, help="measure RSS across this many rounds under ZeRO-3 instead")
    p.add_argument("--processes", type=int, default=2, help="processes of the --rounds runs")
    p.add_argument("--deepspeed", help=f"DeepSpeed config of the --rounds runs (default {ZERO3})")
    p.add_argument("--llm", action="store_true", help="one SmolLM2 client: full, GaLore, LoRA, LoRA 8-bit, 4-bit")
    p.add_argument("--server-state", action="store_true", help="check the memory model (fed_trainer.memory_model)")
    p.add_argument("--state-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tensors", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--glibc-default-malloc", action="store_true", help="--llm without the fixed mmap threshold")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--llm-child", choices=list(LLM_CLIENTS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.state_child is not None:
        state_child(a)
    elif a.server_state:
        state_main(a)
    elif a.llm_child:
        llm_child(a)
    elif a.llm:
        llm_main(a)
    elif a.child:
        child(a)
    elif a.rounds:
        a.deepspeed = a.deepspeed or ZERO3
        rounds_main(a)
    else:
        clients_main(a)


if __name__ == "__main__":
    main()
