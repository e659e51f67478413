"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018): each client's update is clipped to L2
norm S (`update_clip_norm`) and the server adds Gaussian noise of standard deviation sigma * S
(`dp_noise_multiplier`) to the sum of the clipped updates, then divides by the clients sampled per round. The
privacy spent is computed by opacus's RDP accountant for the sampled Gaussian mechanism, with the client sampling
rate q = clients_per_round / num_clients per round.

The accountant assumes Poisson sampling of clients; fed_trainer samples a fixed number without replacement, the
usual approximation in federated DP. The noise of round t is drawn from (seed, t), so a repeated or resumed run
adds the same noise and ends with the same model. The guarantee therefore holds against an observer who does not
know the run's `seed`: keep it as secret as the clients' data (an observer who knows it can subtract the noise).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

TensorDict = dict[str, torch.Tensor]


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds of the sampled Gaussian mechanism (opacus's RDP accountant)."""
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    except ImportError as err:
        raise ImportError("Client-level DP needs opacus: pip install 'fed-trainer[privacy]'.") from err
    if noise_multiplier == 0:
        return float("inf")
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def privacy_spent(args, rounds: int) -> float:
    """Client-level epsilon at `args.dp_delta` after `rounds` DP-FedAvg rounds of the run configured by `args`."""
    sample_rate = args.clients_sampled_per_round / args.num_clients
    return dp_epsilon(args.dp_noise_multiplier, sample_rate, rounds, args.dp_delta)


DP_STREAM = 0x0D9  # tells the noise's random stream apart from the run's other streams drawn from the seed


def dp_noise_generator(seed: int, round_number: int, sharded: bool = False) -> torch.Generator:
    """The generator of round `round_number`'s DP noise, from the run's seed: the same on every process for whole
    tensors; under ZeRO-3 (`sharded`) each process draws its own for its shards (one stream per rank)."""
    rank = dist.get_rank() if sharded and dist.is_initialized() else 0
    entropy = np.random.SeedSequence((seed, DP_STREAM, round_number, rank)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


def private_average(
    weighted_sum: TensorDict, global_state: TensorDict, mass: float, std: float, generator: torch.Generator
) -> TensorDict:
    """The DP-FedAvg update applied to the global model.

    With uniform weights 1/m, `weighted_sum` = (1/m) sum_k W_k over the clients kept (total weight `mass`), so
    G + (sum_k (W_k - G) + N(0, (sigma S)^2)) / m = weighted_sum + (1 - mass) G + N(0, std^2), std = sigma S / m.
    Dividing by the m clients sampled, not by those kept, keeps the sensitivity at S / m when a client drops.
    The noise is drawn from `generator` (`dp_noise_generator`), tensor by tensor in the state's order.
    """
    out = {}
    for name, total in weighted_sum.items():
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float32).to(total.device)
        out[name] = total + (1 - mass) * global_state[name].float() + std * noise
    return out
