"""A malicious node in a real deployment (DESIGN.md, "Trust boundaries"): 1 SuperLink + 3 SuperNodes
over gRPC with TLS and node authentication on loopback, running the test-only app in
``tests/apps/malicious_node``: Stamen's ServerApp, and Stamen's ClientApp except on SuperNode 1
(``--node-config "partition-id=1 num-partitions=3 attack=1"``), which forges another partition's
id (round 1), claims 1e12 examples (round 2) and replays its previous reply (round 3).

Oracle: the same config run in-process (``InProcessGrid`` + ``run_federation``) with partition 1's
train messages simply lost. Every malicious reply must be rejected with its reason, and the final
model must equal the oracle's: the attacker changed nothing but the rejection counts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from stamen import config as C
from stamen.server.checkpoint import read_checkpoint
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation

ROOT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "apps" / "malicious_node"
NODES, ATTACKER, ROUNDS = 3, 1, 3
#: what each round's attack must be rejected as (tests/apps/malicious_node/malicious_client.py)
EXPECTED = {1: ("forge-partition", "wrong-partition"), 2: ("inflate-examples", "num-examples"),
            3: ("replay-previous-round", "wrong-round")}


def _cfg(*extra):
    return C.load(ROOT / "stamen/configs/default.toml", [
        f"federation.clients={NODES}", f"run.rounds={ROUNDS}", "task.partition='iid'", "task.model='mlp'",
        "task.hidden=16", "task.local_epochs=1", "federation.round_timeout_s=300", "run.name='deploy-malicious'",
        *extra])


class LosesPartition(InProcessGrid):
    """The oracle's grid: the train messages of one partition are lost (its node never answers)."""

    def __init__(self, cfg, lost: int):
        super().__init__(cfg)
        self.lost_node = self.node_ids[lost]  # the node whose context holds partition-id ``lost``
        assert int(self.contexts[self.lost_node].node_config["partition-id"]) == lost

    def send_and_receive(self, messages, *, timeout=None):
        kept = [m for m in messages if not (m.metadata.message_type == MessageType.TRAIN
                                            and m.metadata.dst_node_id == self.lost_node)]
        return super().send_and_receive(kept, timeout=timeout)


def _final_arrays(out: Path) -> dict[str, np.ndarray]:
    tree = read_checkpoint(out / "checkpoint.npz")
    assert tree["round"] == ROUNDS
    return tree["arrays"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_the_attacks_are_what_the_app_says():
    """The app's attack schedule (checked here, without processes) is the one EXPECTED names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("malicious_client", APP / "malicious_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {r: module.attack_for(r) for r in EXPECTED} == {r: a for r, (a, _) in EXPECTED.items()}


@pytest.mark.slow
def test_a_malicious_supernode_is_rejected_and_the_model_equals_the_run_without_it(tmp_path):
    from stamen.deploy.local import LocalFederation

    class AttackFederation(LocalFederation):
        """The repository's loopback federation, with ``attack=1`` in SuperNode ATTACKER's node config."""

        def supernode_argv(self, i: int) -> list[str]:
            argv = super().supernode_argv(i)
            if i == ATTACKER:
                k = argv.index("--node-config")
                argv[k + 1] += " attack=1"
            return argv

    cfg = _cfg()
    app = shutil.copytree(APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    deployed = tmp_path / "deployed"
    with AttackFederation(NODES, tmp_path / "federation") as fed:
        assert fed.tls and fed.node_auth
        superlink = fed.procs.started["superlink"].argv
        assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
        assert "attack=1" in " ".join(fed.procs.started[f"supernode-{ATTACKER}"].argv)
        fed.app_dir = Path(app)  # `flwr run` uploads the malicious app instead of the generated one
        result = fed.run(cfg, deployed, timeout=900)
        # the ClientApps' output lands in their SuperNode's log, or in the shared warm-ClientApp zygote's
        logs = "\n".join(s.log.read_text(errors="replace") for s in fed.procs.started.values() if s.log.exists())
        attacker_id = fed.node_ids[ATTACKER]
    assert result.ok, result.log[-3000:]
    assert fed.procs.leftovers() == [], "processes outlived the federation"

    rows = _rows(deployed)
    table = []
    for row in rows:
        attack, reason = EXPECTED[row["round"]]
        table.append({"round": row["round"], "attack": attack, "rejected_reasons": row["rejected_reasons"],
                      "clients": row["clients"], "missing": row["missing"]})
    print("\nmalicious node (partition 1):\n" + json.dumps(table, indent=1))
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        attack, reason = EXPECTED[row["round"]]
        assert row["rejected_reasons"] == {reason: 1}, (attack, row)
        assert row["rejected"] == 1 and row["clients"] == NODES - 1 and row["missing"] == 0 and not row["failed"]
    # the attacker's ClientApp mounted each attack once, and no other node attacked
    mounted = re.findall(r"malicious node \(partition-id (\d+)\): round (\d+): ([a-z-]+)", logs)
    assert sorted(set(mounted)) == [(str(ATTACKER), str(r), a) for r, (a, _) in sorted(EXPECTED.items())], mounted
    # and the ServerApp rejected replies from the attacker's (authenticated) node id only
    rejected_from = set(re.findall(r"rejected reply from node (\d+)", result.log))
    assert rejected_from == {str(attacker_id)}, (rejected_from, attacker_id)

    # the oracle: partition 1's train replies lost, everything else the same
    oracle = tmp_path / "oracle"
    run_federation(LosesPartition(cfg, ATTACKER), cfg, oracle)
    oracle_rows = _rows(oracle)
    assert [(r["clients"], r["missing"], r["rejected"]) for r in oracle_rows] == [(NODES - 1, 1, 0)] * ROUNDS
    got, want = _final_arrays(deployed), _final_arrays(oracle)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # a control: with partition 1 honest the model differs, so the equality above is not vacuous
    honest = tmp_path / "honest"
    run_federation(InProcessGrid(cfg), cfg, honest)
    moved = max(float(np.abs(_final_arrays(honest)[k] - want[k]).max()) for k in want)
    assert moved > 1e-4, "partition 1's updates do not change the model: the comparison proves nothing"
    for a, b in zip(rows, oracle_rows):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
