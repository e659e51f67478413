"""Bytes a federated run keeps per process, as formulas in the parameter count (the tables of docs/scaling.md).

With P the model's parameters, T the trainable ones (all of them for full weights, the adapters for LoRA), b the
model's bytes per value (2 for bfloat16) and N the ranks a DeepSpeed ZeRO run partitions over:

Server state (`server_state_bytes`; on `server_state_device`, partitioned by ZeRO-3 like the model):

- global copy: 4 T for a float32 master of a 16-bit model (`server_dtype="float32"`), else b T;
- running sum of the round's payloads: 4 T (a robust `aggregation_rule` keeps every payload instead: 4 T each);
- server optimizer buffers: 4 T each, one for fedavgm and nesterov, two for fedadam, fedyogi and fedadagrad;
- SCAFFOLD: the server control and the round's control sum, 8 T; and on the CPU each client's c_k once it has
  trained, 4 T per client (`client_state_bytes`), and while a round lasts the new c_k of each client it has trained
  so far, 4 T more per client (beside its old one until the round ends: a round can still be undone);
- a round 0 of gradients (Fed-SB's LoRA-SB initialisation), with G the values of the weights whose gradients the
  clients send: their running sum, 4 G (a robust rule keeps every client's: 4 G each), in round 0 in place of the
  payloads' (the peak, 4 (G - T) more, when G > T).

Client training (`client_training_bytes`; on the model's device; activations are not modelled):

- without DeepSpeed: weights b P, gradients b T, optimizer 2 b T for AdamW (torch keeps its moments in the
  parameter's dtype; Adafactor and SGD without momentum keep next to nothing: 0); a SCAFFOLD client also holds its
  start weights, c - c_k and its new c_k in float32, 12 T;
- and at the peak, the larger of two transients (`step_transient_bytes`), with L the values of the largest trainable
  tensor and E those of a trainable weight the model uses twice (input and output embeddings tied), 0 if none:
  torch's AdamW step (`adamw_torch`) holds sqrt(v) of every trainable value at once with its multi-tensor kernels,
  its default on CUDA (b T), or of one tensor at a time, and its quotient, in its per-tensor loop, its default on
  the CPU (2 b L; the fused AdamW, Trainer's default `adamw_torch_fused`, none); autograd sums a tied weight's two
  gradients out of place, beside both (2 b E);
- under DeepSpeed with a 16-bit model (the ZeRO paper's mixed-precision Adam: 16-bit weights and gradients, a float32
  master, momentum and variance, 12 T): stage 1 2P + 2T + 12T/N, stage 2 2P + 14T/N, stage 3 (2P + 14T)/N.

Not modelled: activations, the transients of other optimizers and of DeepSpeed, the per-client state of
FedSA-LoRA (each client's B) and of error feedback (each client's residual), kept on the CPU, and with compressed
uplinks the round's message, held (once) until the replies are decoded: b T more for a 16-bit model (the cast of
its float32 master; without compression a client lets go of it once loaded). Checked against the
tensors the CPU allocator holds in bench/memory.py (`--server-state`), where activations are small.
"""

from __future__ import annotations

OPTIMIZER_BUFFERS = {"none": 0, "fedavgm": 1, "nesterov": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2}
FLOAT32 = 4
ZERO_OPTIMIZER_BYTES = 12  # float32 master weight, momentum and variance per trainable value (ZeRO, 1910.02054)
MOMENTLESS_OPTIMIZERS = ("sgd", "adafactor")
FOREACH_DEVICES = ("cuda", "xpu", "mtia")  # torch.utils._foreach_utils: where its optimizers default to foreach


def server_state_bytes(
    trainable: int,
    dtype_bytes: int,
    *,
    server_optimizer: str = "none",
    server_dtype: str = "float32",
    strategy: str = "fedavg",
    payloads_kept: int = 0,
    downlink_reference: bool = False,
    gradient_values: int = 0,
) -> int:
    """Bytes of the server state over `trainable` averaged values of `dtype_bytes` each (a ZeRO-3 rank: its
    partition's), at its largest. `payloads_kept`: the clients' payloads a robust aggregation rule keeps at once (0: a
    running sum); `downlink_reference`: a compressed downlink's copy of the initial message, in the model's dtype;
    `gradient_values`: the values whose gradients the clients of a round 0 send (`Strategy.gradient_parameters`)."""
    kept = max(payloads_kept, 1)
    master = FLOAT32 if server_dtype == "float32" and dtype_bytes < FLOAT32 else dtype_bytes
    per_value = master + FLOAT32 * (kept + OPTIMIZER_BUFFERS[server_optimizer])
    if downlink_reference:
        per_value += dtype_bytes
    if strategy == "scaffold":
        per_value += 2 * FLOAT32
    # round 0 (if any) sums the clients' gradients in place of their payloads
    return trainable * per_value + FLOAT32 * kept * max(gradient_values - trainable, 0)


def client_state_bytes(trainable: int, strategy: str = "fedavg") -> int:
    """Bytes the server keeps on the CPU for each client that has trained (SCAFFOLD's c_k; 0 for the others); as
    much again, until the round ends, for each client trained in the round so far."""
    return FLOAT32 * trainable if strategy == "scaffold" else 0


def client_training_bytes(
    params: int,
    trainable: int,
    dtype_bytes: int,
    *,
    optim: str = "adamw_torch_fused",  # Trainer's default (torch >= 2.8)
    zero_stage: int = 0,
    ranks: int = 1,
    strategy: str = "fedavg",
    largest: int = 0,
    tied: int = 0,
    device_type: str = "cuda",
) -> int:
    """Bytes of one client's training on the model's device at its peak, without activations (see the module
    docstring): `largest` and `tied` are the values of the largest trainable tensor and of a trainable tied weight,
    `device_type` where it trains (torch's AdamW picks its kernels by it)."""
    if zero_stage == 0:
        moments = 0 if any(optim.startswith(name) for name in MOMENTLESS_OPTIMIZERS) else 2
        controls = 3 * FLOAT32 * trainable if strategy == "scaffold" else 0
        transient = step_transient_bytes(trainable, dtype_bytes, optim, largest, tied, device_type)
        return params * dtype_bytes + trainable * dtype_bytes * (1 + moments) + controls + transient
    weights, gradients, optimizer = 2 * params, 2 * trainable, ZERO_OPTIMIZER_BYTES * trainable
    if zero_stage == 1:
        return weights + gradients + optimizer // ranks
    if zero_stage == 2:
        return weights + (gradients + optimizer) // ranks
    return (weights + gradients + optimizer) // ranks


def step_transient_bytes(
    trainable: int, dtype_bytes: int, optim: str, largest: int, tied: int, device_type: str = "cuda"
) -> int:
    """Bytes a client's training holds for a moment on top of its weights, gradients and optimizer state: the larger
    of torch's AdamW step's temporaries and the sum of a tied weight's two gradients (see the module docstring)."""
    step = 0
    if optim == "adamw_torch":
        step = trainable if device_type in FOREACH_DEVICES else 2 * largest
    return dtype_bytes * max(step, 2 * tied)


def tensor_values(model) -> tuple[int, int]:
    """The values of `model`'s largest trainable tensor, and of its input embeddings when they are trainable and tied
    to its output embeddings (else 0): `client_training_bytes`'s `largest` and `tied`."""
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    weights = [embedding_weight(model, kind) for kind in ("input", "output")]
    tied = weights[0] is not None and weights[0] is weights[1] and weights[0].requires_grad
    return largest, weights[0].numel() if tied else 0


def embedding_weight(model, kind: str):
    """The weight of `model`'s input or output (`kind`) embeddings, or None where it has none."""
    getter = getattr(model, f"get_{kind}_embeddings", None)
    try:
        module = getter() if getter is not None else None
    except NotImplementedError:  # transformers' answer for a model without them (an image classifier)
        return None
    return getattr(module, "weight", None)
