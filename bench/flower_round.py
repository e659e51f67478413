"""A Flower round on loopback against the same round simulated: where a deployed round's time goes.

Runs examples/flower (all-MiniLM-L6-v2 on BBC News, 2 clients, `--fed-args`) twice: in this process (the
simulation) and with `flwr run` on a SuperLink and two SuperNodes on 127.0.0.1 (tests/loopback.py), then flwr's own
round trip on the same deployment (bench/flower_echo: a tiny message to both SuperNodes, echoed by a ClientApp that
imports flwr alone, timed with the deployed round's exchange; the floor under any round). Both runs log each
round's `round_runtime`; the deployed run also logs where its nodes' time went
(`fed_trainer.flower.server_app.GridClients`): `nodes_s` (sending the messages to the last reply) and the nodes'
mean `node_delivery_s` (sending to the ClientApp process's start), `node_start_s` (the ClientApp process's start and
imports, and the hand-over to the node's warm worker), `node_build_s` (the trainer, unless built ahead),
`node_update_s` (loading the message, training, the payload), `node_train_s` (the local steps alone) and
`node_return_s` (the node's end to the server's having the reply). Reported per round and as
medians, with the ratio of the deployed round to the simulated one (goal: at most 1.2).

    python bench/flower_round.py --json bench/results/flower_round.json
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import median, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import Deployment, flwr_run, simulated  # noqa: E402

ECHO = Path(__file__).resolve().parent / "flower_echo"

FED_ARGS = "--strategy fedavg --num_rounds 5 --local_steps 10 --max_train_samples 256 --max_eval_samples 64"
PHASES = ("nodes_s", *(f"node_{phase}_s" for phase in ("delivery", "start", "build", "update", "train", "return")))


def rounds_of(output_dir: Path) -> list[dict]:
    """The round entries a run's trainer_state.json (or the simulation's rounds.json) holds."""
    state = output_dir / "trainer_state.json"
    if state.exists():
        return [e for e in json.loads(state.read_text())["log_history"] if "round" in e]
    return json.loads((output_dir / "rounds.json").read_text())


def echo_round_trips(deployment: Deployment, out: Path, rounds: int) -> list[float]:
    """flwr's own round trip on `deployment`, `rounds` times: a tiny message to both SuperNodes, which echo it
    (bench/flower_echo: its ClientApp imports flwr alone), seconds until the server has both replies."""
    deployment.run_app(flwr_run(ECHO, f"out='{out}' rounds={rounds}"), out)
    return json.loads(out.read_text())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fed-args", default=FED_ARGS, help=f"the run's flags (default: {FED_ARGS})")
    p.add_argument("--node-config", default="", help='more node config for both SuperNodes, e.g. "build-ahead=false"')
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        start = time.perf_counter()
        simulated_rounds = rounds_of(simulated(a.fed_args, root / "simulated"))
        simulated_s = time.perf_counter() - start
        deployment = Deployment(root / "loopback", secure=False, node_config=a.node_config)
        try:
            start = time.perf_counter()
            deployed_rounds = rounds_of(deployment.run(a.fed_args, root / "deployed"))
            deployed_s = time.perf_counter() - start
            echoes = echo_round_trips(deployment, root / "echo.json", len(deployed_rounds))
        finally:
            deployment.stop()
    rows = []
    for sim, dep in zip(simulated_rounds, deployed_rounds, strict=True):
        row = {"round": sim["round"], "simulated_s": sim["round_runtime"], "deployed_s": dep["round_runtime"]}
        row["ratio"] = row["deployed_s"] / row["simulated_s"]
        rows.append({**row, **{phase: dep[phase] for phase in PHASES}})
    summary = {
        "work": f"examples/flower, 2 clients on 2 SuperNodes (insecure loopback): {a.fed_args}",
        "node_config": a.node_config,
        "median_simulated_round_s": median([r["simulated_s"] for r in rows]),
        "median_deployed_round_s": median([r["deployed_s"] for r in rows]),
        "median_ratio": median([r["ratio"] for r in rows]),
        "goal_ratio": 1.2,
        **{f"median_{phase}": median([r[phase] for r in rows]) for phase in PHASES},
        "median_echo_round_trip_s": median(echoes),
        "echo_round_trips_s": echoes,
        "simulated_run_s": simulated_s,
        "deployed_run_s": deployed_s,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    report("A Flower round on loopback against the simulated round", rows, summary, a.json)


if __name__ == "__main__":
    main()
