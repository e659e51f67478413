"""Compressed client payloads (`update_compression`), with optional error feedback, and compressed server messages
(`downlink_compression`).

Every floating tensor of a client's payload travels compressed: as its difference from the tensor of the same name
in the server's message when there is one (a weight's update, not the weight: updates are small and centred, so
blockwise scales fit them), else as it is. Formats:

- `bf16`: bfloat16, 2 bytes a value.
- `int8`: bitsandbytes' 8-bit blockwise quantization (`quantize_blockwise`: each block of `compression_block_size`
  values scaled by its absmax, then rounded to the nearest of its 256-value dynamic code), 1 byte a value plus a
  float32 absmax a block.
- `nf4`: bitsandbytes' 4-bit NormalFloat (`quantize_4bit`, quant_type "nf4": absmax-scaled blocks rounded to the
  16 NF4 levels), half a byte a value plus a float32 absmax a block.

A compressed tensor is sent as `<name>|<format>` (the values) with `<name>|absmax` (the blocks' scales) and
`<name>|shape` (int64, so the server can undo a flattening); the logged bytes are those tensors', exactly. The
server decodes the payload (adding back its message's tensor) before the strategy aggregates it.

With `compression_error_feedback`, each client keeps the residual e of its last compression and compresses
v + e instead of v, keeping e' = v + e - D(C(v + e)) (error feedback, Seide et al. 2014 / Karimireddy et al. 2019):
what the server receives over rounds adds up to the sum of the true updates minus the last residual. The residual
stays with the client: in the simulation in the strategy's state (round checkpoints; gathered across the ranks of
a client-parallel round), on Flower in the SuperNode's state file.

With `downlink_compression`, every server message travels in the same formats as its difference from the message
at the start of the run (`Strategy.downlink_reference`: the initial model's values, which every client builds
itself), so what is quantized is how far training has moved the model, not the weights. A client trains from the
message it decodes, M^ = M0 + D(C(M - M0)); the server applies its update to the exact message (`translated`: a
payload tensor W_k becomes W_k + M - M^; with a compressed uplink, decoding the update against M does it), so the
quantization error of one round's message perturbs where that round's clients start and is not carried into the
global model. Only strategies whose message is the state their clients train from take it
(`Capabilities.compressed_downlink`).
"""

from __future__ import annotations

import math

import torch

from fed_trainer.distributed import united_across_ranks

TensorDict = dict[str, torch.Tensor]
FORMATS = ("none", "bf16", "int8", "nf4")
BLOCK_SIZES = (64, 128, 256, 512, 1024)  # values per absmax scale that bitsandbytes' blockwise functions take
SEPARATOR = "|"
RESIDUAL = "residual" + SEPARATOR  # prefix of a residual's name in a node's kept state


def quantized(values: torch.Tensor, fmt: str, block: int) -> TensorDict:
    """`values` (float) in format `fmt`, as the tensors that travel (by suffix: the format, `absmax`, `shape`)."""
    import bitsandbytes.functional as bnb

    flat = values.detach().float().reshape(-1).contiguous()
    shape = torch.tensor(values.shape, dtype=torch.int64)
    if fmt == "bf16":
        return {fmt: values.detach().to(torch.bfloat16), "shape": shape}
    if fmt == "int8":
        codes, state = bnb.quantize_blockwise(flat, blocksize=block)
    else:
        codes, state = bnb.quantize_4bit(flat, blocksize=block, quant_type="nf4")
    return {fmt: codes, "absmax": state.absmax.float(), "shape": shape}


def dequantized(parts: TensorDict, fmt: str, block: int) -> torch.Tensor:
    """The float32 tensor `quantized` encoded in `parts`."""
    import bitsandbytes.functional as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type

    shape = torch.Size(parts["shape"].tolist())
    if fmt == "bf16":
        return parts[fmt].float().reshape(shape)
    numel = math.prod(shape)
    if fmt == "int8":
        flat = bnb.dequantize_blockwise(parts[fmt], absmax=parts["absmax"], blocksize=block)
    else:
        state = QuantState(absmax=parts["absmax"], shape=torch.Size([numel]), blocksize=block,
                           code=get_4bit_type("nf4", device="cpu"), quant_type="nf4", dtype=torch.float32)  # fmt: skip
        flat = bnb.dequantize_4bit(parts[fmt], state)
    return flat.float().reshape(shape)


def translated(payload: TensorDict, message: TensorDict, received: TensorDict) -> TensorDict:
    """A client's `payload` as if it had started from the exact `message` rather than the decoded one it
    `received`: each tensor of a message's name moved by message - received (its update kept, applied to the exact
    message)."""
    out = {}
    for name, tensor in payload.items():
        exact = message.get(name)
        if exact is None or exact.shape != tensor.shape or not tensor.is_floating_point():
            out[name] = tensor
            continue
        shift = exact.detach().float() - received[name].detach().float().to(exact.device)
        out[name] = (tensor.detach().float() + shift.to(tensor.device)).to(tensor.dtype)
    return out


def compressible(name: str, tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 0 and SEPARATOR not in name


class UpdateCompressor:
    """Encodes a client's payload (`encoded`, on the client) and decodes it (`decoded`, on the server); keeps each
    client's error-feedback residual."""

    def __init__(self, fmt: str, block: int, error_feedback: bool) -> None:
        self.fmt, self.block, self.error_feedback = fmt, block, error_feedback
        self.residuals: dict = {}  # client -> {tensor name: residual}, on the CPU
        self.kept: TensorDict = {}  # on a SuperNode: its client's residual, from what the node kept
        self._updated: dict = {}  # client -> its new residual (this round, this process)

    @classmethod
    def from_args(cls, args) -> UpdateCompressor | None:
        if args.update_compression == "none":
            return None
        return cls(args.update_compression, args.compression_block_size, args.compression_error_feedback)

    @classmethod
    def for_downlink(cls, args) -> UpdateCompressor | None:
        """The server messages' compression (`downlink_compression`): against the run's initial message, without
        error feedback (the server applies each update to its exact message, so the error does not add up)."""
        if args.downlink_compression == "none":
            return None
        return cls(args.downlink_compression, args.compression_block_size, error_feedback=False)

    def encoded(self, payload: TensorDict, message: TensorDict, client_id, feedback: bool = True) -> TensorDict:
        """The payload as it travels: each floating tensor's difference from `message` (or itself) compressed; with
        error feedback (unless `feedback` is False: a payload that no later one continues, round 0's gradients)
        the client's residual added first and its new one kept."""
        feedback = feedback and self.error_feedback
        residual = self.residuals.get(client_id, self.kept) if feedback else {}
        out, new_residual = {}, {}
        for name, tensor in payload.items():
            if not compressible(name, tensor):
                out[name] = tensor
                continue
            value = tensor.detach().float()
            reference = message.get(name)
            if reference is not None and reference.shape == tensor.shape:
                value = value - reference.detach().float().to(value.device)
            if name in residual:
                value = value + residual[name].to(value.device)
            parts = quantized(value, self.fmt, self.block)
            out.update({f"{name}{SEPARATOR}{suffix}": t for suffix, t in parts.items()})
            if feedback:
                new_residual[name] = (value - dequantized(parts, self.fmt, self.block)).cpu()
        if feedback:
            self._updated[client_id] = new_residual
        return out

    def decoded(self, payload: TensorDict, message: TensorDict) -> TensorDict:
        """The payload `encoded` wrote, as the strategy's tensors (float32 where compressed)."""
        grouped: dict[str, TensorDict] = {}
        out = {}
        for key, tensor in payload.items():
            name, separator, suffix = key.rpartition(SEPARATOR)
            if separator:
                grouped.setdefault(name, {})[suffix] = tensor
            else:
                out[key] = tensor
        for name, parts in grouped.items():
            value = dequantized(parts, self.fmt, self.block)
            reference = message.get(name)
            if reference is not None and reference.shape == value.shape:
                value = value.to(reference.device) + reference.detach().float()
            out[name] = value
        return out

    def client_state(self, client_id) -> TensorDict:
        """On a SuperNode: the residual to keep for the client's next round (named `residual|<tensor>`)."""
        return {RESIDUAL + name: t for name, t in self._updated.get(client_id, {}).items()}

    def catch_up(self, kept: TensorDict) -> None:
        """On a SuperNode: take the client's residual from what the node kept."""
        self.kept = {key[len(RESIDUAL) :]: t for key, t in kept.items() if key.startswith(RESIDUAL)}

    def kept_lost(self) -> None:
        """On a SuperNode that lost the residual it kept: raise with error feedback (only the node held it)."""
        if self.error_feedback:
            raise RuntimeError(
                "this client's machine no longer holds the error-feedback residual it kept after its last round that "
                "reached the server (only that machine held it): restore the node's state-dir, resume from the newest "
                "checkpoint (a node keeps the state of that one and of its last rounds only, for its last "
                "keep-federations runs: node config), or start the run again."
            )

    def synchronize(self) -> None:
        """Every rank of a client-parallel round gets every client's new residual (its next round may be on
        another rank)."""
        self._updated = united_across_ranks(self._updated)

    def finish_round(self) -> None:
        self.residuals.update(self._updated)
        self._updated = {}

    def state_dict(self) -> dict:
        return {"residuals": self.residuals}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = state["residuals"]
