"""A Flower round on loopback against the same round simulated: where a deployed round's time goes.

Runs examples/flower (all-MiniLM-L6-v2 on BBC News, 2 clients, `--fed-args`) twice: in this process (the
simulation) and with `flwr run` on a SuperLink and two SuperNodes on 127.0.0.1 (tests/loopback.py). Both log each
round's `round_runtime`; the deployed run also logs where its nodes' time went (`fed_trainer.flower.server_app`'s
`GridClients`): `nodes_s` (sending the messages to the last reply) and the nodes' mean `node_start_s` (the ClientApp
process's start, imports and connection), `node_build_s` (data and trainer, model included), `node_update_s`
(loading the message, training, the payload) and `node_train_s` (the local steps alone). Reported per round and as
medians, with the ratio of the deployed round to the simulated one (goal: at most 1.2).

    python bench/flower_round.py --json bench/results/flower_round.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import median, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import Deployment, simulated  # noqa: E402

FED_ARGS = "--strategy fedavg --num_rounds 3 --local_steps 10 --max_train_samples 256 --max_eval_samples 64"
PHASES = ("nodes_s", "node_start_s", "node_build_s", "node_update_s", "node_train_s")


def rounds_of(output_dir: Path) -> list[dict]:
    """The round entries a run's trainer_state.json (or the simulation's rounds.json) holds."""
    state = output_dir / "trainer_state.json"
    if state.exists():
        return [e for e in json.loads(state.read_text())["log_history"] if "round" in e]
    return json.loads((output_dir / "rounds.json").read_text())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fed-args", default=FED_ARGS, help=f"the run's flags (default: {FED_ARGS})")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        start = time.perf_counter()
        simulated_rounds = rounds_of(simulated(a.fed_args, root / "simulated"))
        simulated_s = time.perf_counter() - start
        deployment = Deployment(root / "loopback", secure=False)
        try:
            start = time.perf_counter()
            deployed_rounds = rounds_of(deployment.run(a.fed_args, root / "deployed"))
            deployed_s = time.perf_counter() - start
        finally:
            deployment.stop()
    rows = []
    for sim, dep in zip(simulated_rounds, deployed_rounds, strict=True):
        row = {"round": sim["round"], "simulated_s": sim["round_runtime"], "deployed_s": dep["round_runtime"]}
        row["ratio"] = row["deployed_s"] / row["simulated_s"]
        rows.append({**row, **{phase: dep[phase] for phase in PHASES}})
    summary = {
        "work": f"examples/flower, 2 clients on 2 SuperNodes (insecure loopback): {a.fed_args}",
        "median_simulated_round_s": median([r["simulated_s"] for r in rows]),
        "median_deployed_round_s": median([r["deployed_s"] for r in rows]),
        "median_ratio": median([r["ratio"] for r in rows]),
        "goal_ratio": 1.2,
        **{f"median_{phase}": median([r[phase] for r in rows]) for phase in PHASES},
        "simulated_run_s": simulated_s,
        "deployed_run_s": deployed_s,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report("A Flower round on loopback against the simulated round", rows, summary, a.json)


if __name__ == "__main__":
    main()
