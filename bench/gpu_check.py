"""The one-shot accelerator check: what only a GPU can show, in one table (run it through `bench/gpu_check.sh`).

Checks, each on the bundled SmolLM2-135M (causal LM on chatterbot-corpus blocks of `--seq-len` tokens, batch
`--batch-size`) unless said otherwise:

- `plain_bf16`: a plain `Trainer`, `--steps` steps on the bf16 model: the baseline.
- `fedavg_bf16`, `fedit_bf16`: `FederatedTrainer` with 2 clients x 1 round x `--steps`/2 local steps (the same
  number of optimizer steps and tokens), full weights and LoRA (r 16, every linear layer); the throughput ratio to
  the baseline, and the peak memory.
- `fedavg_bf16_state_cpu`: `fedavg_bf16` with `server_state_device="cpu"`: the global copy and the running sum on
  the CPU (on a GPU its peak memory is the model's and one client's training, not the server state's).
- `galore_fedavg`: FedAvg with GaLore clients (`galore_adamw`, rank 64, attention and MLP projections).
- `qlora_4bit`: LoRA on a 4-bit nf4 base (bitsandbytes), bf16 compute.
- `fed_sb_bf16`, `fed_sb_bf16_state_cpu`: Fed-SB (LoRA-SB initialisation: round 0 sums the clients' dense
  gradients where the server state lives, then takes each layer's SVD on the model's device) and its round 1, with
  the server state on the model's device and on the CPU: the same loss either way. Not timed against the baseline
  (round 0 adds a gradient pass).
- `memory_model`, `memory_model_state_cpu`: the memory model (`fed_trainer.memory_model`) against the tensors a
  FedAvg round of 2 clients holds at its peak above the loaded model (`torch.cuda.max_memory_allocated`, less what
  was allocated before; on the CPU the allocator's count, `memory.allocated_tensor_bytes`), with the server state on
  the model's device and on the CPU, at batch 2 x 32 tokens (activations, which the model leaves out, are small) and
  torch's unfused AdamW (`adamw_torch`: its step's transient is its kernels' own, bT on CUDA).
- `zero3_1proc`: `examples/fed_glue.py` (MiniLM) under DeepSpeed ZeRO-3 in one process (`accelerate launch`), with
  `server_state_device="cpu"`.
- `client_parallel_2proc`: the same script's clients shared over 2 processes (`torchrun`; NCCL on GPUs); run when
  there are at least 2 GPUs (or on the CPU with `--cpu`, over gloo), reported as not run otherwise.

Peak memory: `torch.cuda.max_memory_allocated` on a GPU (reset before each check); with `--cpu`, the process's RSS
high-water mark above the imports'. A check that raises, or whose loss is not finite, is marked FAIL and the
script exits with status 1 after the table: nothing is skipped silently.

    bash bench/gpu_check.sh --json bench/results/gpu_check.json     # on a GPU machine
    bash bench/gpu_check.sh --cpu                                    # the same code on the CPU, small (CI runs it)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from common import current_rss_mib, report
from memory import allocated_tensor_bytes, chatterbot_blocks, peak_rss_mib, reset_peak_rss

from fed_trainer import FederatedConfig, FederatedTrainer

REPO = Path(__file__).resolve().parent.parent
# not timed against the baseline: other work (Fed-SB's round 0; the launched MiniLM runs), or measured against the
# memory model
UNTIMED = ("fed_sb_bf16", "fed_sb_bf16_state_cpu", "zero3_1proc", "client_parallel_2proc", "memory_model",
           "memory_model_state_cpu")  # fmt: skip
TINY_GLUE = ["--max_train_samples", "64", "--max_eval_samples", "32", "--num_rounds", "1", "--local_steps", "2",
             "--max_seq_length", "32", "--disable_tqdm", "true", "--save_strategy", "no"]  # fmt: skip


class Meter:
    """Peak memory of one check: CUDA's allocator peak, or the process's RSS high-water mark on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Meter:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = current_rss_mib()
            reset_peak_rss()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = peak_rss_mib() - self.base
        self.seconds = time.perf_counter() - self.start


def smollm2(a, device: str, quantized: bool = False) -> torch.nn.Module:
    """SmolLM2-135M in bf16 (its first `a.layers` decoder layers when given), or on a 4-bit nf4 base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fed_trainer.assets import smollm2_path

    layers = {} if a.layers is None else {"num_hidden_layers": a.layers}
    if quantized:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=config, device_map=device,
                                                    **layers)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16, **layers).to(device)


def common_args(a, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=a.batch_size, learning_rate=1e-4, report_to="none",
                disable_tqdm=True, use_cpu=a.cpu, dataloader_pin_memory=False, seed=0, save_strategy="no",
                lr_scheduler_type="constant")  # fmt: skip


def plain(a, data, device: str) -> dict:
    from transformers import Trainer, TrainingArguments

    model = smollm2(a, device)
    with tempfile.TemporaryDirectory() as out, Meter(device) as meter:
        trainer = Trainer(model=model, args=TrainingArguments(max_steps=a.steps, **common_args(a, out)),
                          train_dataset=data)  # fmt: skip
        loss = trainer.train().training_loss
    return dict(loss=loss, seconds=meter.seconds, peak_mib=meter.peak_mib)


def federated(a, data, device: str, strategy: str, lora: bool = False, quantized: bool = False, **config) -> dict:
    from peft import LoraConfig

    model = smollm2(a, device, quantized)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    half = len(data) // 2
    clients = [data.select(range(half)), data.select(range(half, len(data)))]
    with tempfile.TemporaryDirectory() as out, Meter(device) as meter:
        args = FederatedConfig(num_clients=2, num_rounds=1, local_steps=a.steps // 2, strategy=strategy,
                               **common_args(a, out), **config)  # fmt: skip
        trainer = FederatedTrainer(model=model, args=args, client_datasets=clients, peft_config=peft)
        trainer.train()
    loss = [e["loss"] for e in trainer.state.log_history if "round" in e][-1]  # round 1's (Fed-SB's has a round 0)
    return dict(loss=loss, seconds=meter.seconds, peak_mib=meter.peak_mib)


def memory_model_check(a, data, device: str, state_device: str) -> dict:
    """A FedAvg round of 2 clients x 2 steps at batch 2 x 32 tokens: the peak of the tensors it allocates above the
    loaded model, against `fed_trainer.memory_model` (the round's second client trains beside the state)."""
    from fed_trainer.memory_model import client_training_bytes, server_state_bytes, tensor_values

    model = smollm2(a, device)
    blocks = data.map(lambda row: {k: row[k][:32] for k in ("input_ids", "labels")}).select(range(4))
    clients = [blocks.select(range(2)), blocks.select(range(2, 4))]
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(num_clients=2, num_rounds=1, local_steps=2, strategy="fedavg", optim="adamw_torch",
                               server_state_device=state_device,
                               **{**common_args(a, out), "per_device_train_batch_size": 2})  # fmt: skip
        with allocated_above(device) as allocated:  # the server state is made as the trainer is built
            trainer = FederatedTrainer(model=model, args=args, client_datasets=clients)
            trainer.train()
    params = sum(p.numel() for p in model.parameters())
    largest, tied = tensor_values(model)
    training = client_training_bytes(params, params, 2, optim="adamw_torch", largest=largest, tied=tied,
                                     device_type=device) - 2 * params  # (the weights were loaded)  # fmt: skip
    state = server_state_bytes(params, 2) if trainer.strategy.state_device.type == device else 0
    loss = next(e["loss"] for e in trainer.state.log_history if "round" in e)
    peak, predicted = allocated["peak"] / 2**20, (state + training) / 2**20
    return dict(loss=loss, peak_mib=peak, predicted_peak_mib=predicted, model_ratio=peak / predicted)


@contextmanager
def allocated_above(device: str):
    """Yields a dict that holds, once the block ends, the peak bytes of the tensors allocated in the block above
    those allocated before it (`peak`): CUDA's allocator's count, or on the CPU `memory.allocated_tensor_bytes`."""
    if device != "cuda":
        with allocated_tensor_bytes() as counts:
            yield counts
        return
    counts: dict[str, int] = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    yield counts
    torch.cuda.synchronize()
    counts["peak"] = torch.cuda.max_memory_allocated() - before


def launched(a, launcher: list[str], name: str, *options: str) -> dict:
    """examples/fed_glue.py (MiniLM, with `options`) under `launcher`; its eval loss, and the whole command's wall
    time."""
    with tempfile.TemporaryDirectory() as out:
        script = [str(REPO / "examples" / "fed_glue.py"), "--output_dir", out, *TINY_GLUE, *options]
        command = [*launcher, *script, *(["--use_cpu"] if a.cpu else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{name} exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        loss = json.loads((Path(out) / "eval_results.json").read_text())["eval_loss"]
    return dict(loss=loss, seconds=seconds, peak_mib=float("nan"))


def zero3(a, device: str) -> dict:
    config = REPO / "recipes" / "accelerate" / "zero3.yaml"
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
                "--num_processes", "1"]  # fmt: skip
    return launched(a, launcher, "ZeRO-3", "--server_state_device", "cpu")


def client_parallel(a, device: str) -> dict | None:
    if device == "cuda" and torch.cuda.device_count() < 2:
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return launched(a, launcher, "client-parallel")


def main() -> None:
    from common import parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run every check on the CPU, small (what CI runs)")
    p.add_argument("--steps", type=int, help="optimizer steps of each check (default: 20 on a GPU, 2 with --cpu)")
    p.add_argument("--layers", type=int, help="keep SmolLM2's first N decoder layers (default: all 30; 2 with --cpu)")
    p.set_defaults(seq_len=None, batch_size=None)
    a = p.parse_args()
    if not a.cpu and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: install the CUDA torch wheel (README: TORCH_INDEX_URL), or pass --cpu.")
    device = "cpu" if a.cpu else "cuda"
    a.steps = a.steps or (2 if a.cpu else 20)
    a.seq_len = a.seq_len or (32 if a.cpu else 256)
    a.batch_size = a.batch_size or (2 if a.cpu else 8)
    a.layers = a.layers or (2 if a.cpu else None)
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    from fed_trainer.assets import smollm2_path

    disable_progress_bar()
    data = chatterbot_blocks(AutoTokenizer.from_pretrained(smollm2_path()), a.seq_len, a.steps * a.batch_size)
    checks = {
        "plain_bf16": lambda: plain(a, data, device),
        "fedavg_bf16": lambda: federated(a, data, device, "fedavg"),
        "fedit_bf16": lambda: federated(a, data, device, "fedit", lora=True),
        "fedavg_bf16_state_cpu": lambda: federated(a, data, device, "fedavg", server_state_device="cpu"),
        "galore_fedavg": lambda: federated(a, data, device, "fedavg", optim="galore_adamw",
                                           optim_target_modules=["self_attn", "mlp"],
                                           optim_args="rank=64,update_proj_gap=200,scale=0.25"),
        "qlora_4bit": lambda: federated(a, data, device, "fedit", lora=True, quantized=True),
        "fed_sb_bf16": lambda: federated(a, data, device, "fed_sb", lora=True),
        "fed_sb_bf16_state_cpu": lambda: federated(a, data, device, "fed_sb", lora=True, server_state_device="cpu"),
        "memory_model": lambda: memory_model_check(a, data, device, device),
        "memory_model_state_cpu": lambda: memory_model_check(a, data, device, "cpu"),
        "zero3_1proc": lambda: zero3(a, device),
        "client_parallel_2proc": lambda: client_parallel(a, device),
    }  # fmt: skip
    rows, failed = [], []
    tokens = a.steps * a.batch_size * a.seq_len
    for name, check in checks.items():
        try:
            result = check()
            if result is None:
                rows.append({"check": name, "status": "not run (fewer than 2 GPUs)"})
                continue
            if not math.isfinite(result["loss"]):
                raise RuntimeError(f"loss {result['loss']}")
            rows.append({"check": name, "status": "ok", **result})
        except Exception as err:  # every check runs; the failures are listed and fail the script
            traceback.print_exc()
            failed.append(name)
            rows.append({"check": name, "status": f"FAIL: {type(err).__name__}: {str(err)[:200]}"})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    baseline = next((r for r in rows if r["check"] == "plain_bf16" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok" and row["check"] not in UNTIMED:
            row["tokens_per_s"] = tokens / row["seconds"]
            if baseline is not None:
                row["throughput_ratio"] = baseline["seconds"] / row["seconds"]
                row["peak_ratio"] = row["peak_mib"] / baseline["peak_mib"]
    columns = ["check", "status", "loss", "seconds", "tokens_per_s", "throughput_ratio", "peak_mib", "peak_ratio",
               "predicted_peak_mib", "model_ratio"]  # fmt: skip
    rows = [{c: row.get(c, "-") for c in columns} for row in rows]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    summary = {
        "device": f"{name} ({torch.cuda.device_count() if device == 'cuda' else os.cpu_count()} "
        f"{'GPUs' if device == 'cuda' else 'CPUs'})",
        "work": f"SmolLM2-135M ({a.layers or 'all'} layers), {a.steps} steps x batch {a.batch_size} x {a.seq_len} "
        "tokens (ZeRO-3 and client-parallel: examples/fed_glue.py on MiniLM, 1 round of 2 steps, wall time of "
        "the whole launch)",
        "peak": "torch.cuda.max_memory_allocated, MiB" if device == "cuda" else "RSS high-water mark above the "
        "check's start, MiB",
        "memory_model": "the tensors allocated above the loaded model at their peak (on the CPU the allocator's "
        "count), against fed_trainer.memory_model's server state (when on the model's device) plus a client's "
        "training without the weights",
        "failed": failed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    report("Accelerator check", rows, summary, a.json)
    if failed:
        raise SystemExit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
