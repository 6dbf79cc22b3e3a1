"""Stamen as a library and as a Flower citizen: the Python API, the round pipeline inside a user's
own ServerApp (Flower's own loop), and interop with plain Flower ClientApps in both directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import stamen
from stamen import schema as S
from stamen.client.flower_adapter import adapt
from stamen.config import ConfigError, load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.tasks.task import evaluate, get_weights, load_task, set_weights

TINY = ["federation.clients=4", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]


@pytest.fixture(autouse=True)
def _identity():
    from flwr.supercore.task_identity import TaskIdentity

    if getattr(TaskIdentity, "_task_id", None) is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_run_experiment_and_load_run(tmp_path):
    result = stamen.run_experiment(None, TINY, tmp_path / "run", engine="inprocess")
    assert result.dir == tmp_path / "run" and result.summary["rounds"] == 3
    frame = result.metrics
    assert list(frame["round"]) == [1, 2, 3] and frame["test_accuracy"].iloc[-1] == result.summary["final_test_accuracy"]
    again = stamen.load_run(tmp_path / "run")
    assert again.summary == result.summary and again.config == result.config
    # a dict config and a config object give the same run
    same = stamen.run_experiment({"federation": {"clients": 4}}, TINY[1:], tmp_path / "dict", engine="inprocess")
    assert same.rows == [{**r, "wall_s": s["wall_s"]} for r, s in zip(result.rows, same.rows)]
    with pytest.raises(ConfigError, match="client_curriculum"):
        stamen.run_experiment(None, TINY + ["strategy.name=curriculum", "strategy.client_curriculum=true",
                                            "privacy.clip=1", "privacy.noise_multiplier=1"],
                              tmp_path / "refused", engine="inprocess")
    with pytest.raises(FileNotFoundError, match="not a Stamen run directory"):
        stamen.load_run(tmp_path)


def test_stamen_run_engine_inprocess_is_the_api_run(tmp_path):
    """`stamen run --engine inprocess` and the API's in-process run of the same config write the same rows."""
    from typer.testing import CliRunner

    from stamen.cli import app

    args = [a for kv in TINY for a in ("--set", kv)]
    result = CliRunner().invoke(app, ["run", *args, "--engine", "inprocess", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    cli = stamen.load_run(tmp_path / "cli")
    api = stamen.run_experiment(None, TINY, tmp_path / "api", engine="inprocess")
    assert [{**r, "wall_s": 0} for r in cli.rows] == [{**r, "wall_s": 0} for r in api.rows]
    bad = CliRunner().invoke(app, ["run", *args, "--engine", "ray", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--engine" in bad.output and not (tmp_path / "bad").exists()


def test_the_round_pipeline_runs_under_flowers_own_loop():
    """A user's own ServerApp: the pipeline is a Flower Strategy; Flower's Strategy.start drives it."""
    cfg = load(overrides=TINY + ["privacy.clip=0.5", "privacy.noise_multiplier=1.0", "privacy.sampling='none'",
                                 "privacy.delta=1e-3"])
    grid = InProcessGrid(cfg)
    pipeline, task = stamen.bound_pipeline(cfg, grid)
    result = pipeline.start(grid, initial_arrays=S.to_array_record(task.initial_weights()), num_rounds=3)
    assert pipeline.privacy.accountant.rounds == 3 and math.isfinite(pipeline.privacy.accountant.epsilon())
    final = S.from_array_record(result.arrays)
    assert any(not np.array_equal(final[k], v) for k, v in task.initial_weights().items())


# -- a quickstart-style plain Flower ClientApp --------------------------------------------------

def plain_client_app(cfg) -> ClientApp:
    """What a Flower quickstart ClientApp does: load the weights, train, reply weights + num-examples."""
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = task.new_model()
        set_weights(model, {k: v.numpy() for k, v in msg.content["arrays"].items()})
        X, y = task.data.client(int(context.node_config["partition-id"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(0, len(y), 16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.as_tensor(X[i:i + 16])), torch.as_tensor(y[i:i + 16])).backward()
            opt.step()
        content = RecordDict({"arrays": S.to_array_record(get_weights(model)),
                              "metrics": MetricRecord({"num-examples": len(y), "train_loss": 0.0})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        model = task.new_model()
        set_weights(model, {k: v.numpy() for k, v in msg.content["arrays"].items()})
        X, y = task.data.client(int(context.node_config["partition-id"]))
        loss, acc = evaluate(model, X, y)
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": len(y), "eval_loss": loss,
                                                                     "eval_acc": acc})}), reply_to=msg)

    return app


class AppGrid(InProcessGrid):
    """The in-process grid running a given ClientApp object on every node."""

    def __init__(self, cfg, app: ClientApp):
        super().__init__(cfg)
        self.app = app

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            try:
                out.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # as Flower's runtime: the ClientApp's exception is an error reply
                from flwr.app import Error

                out.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return out


def _sizes(cfg):
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    return max(len(task.data.client(p)[1]) for p in range(cfg.federation.clients))


@pytest.mark.parametrize("extra", [[], ["compression.codec=topk", "compression.ratio=0.3"],
                                   ["strategy.name=fedprox", "privacy.clip=1.0", "privacy.noise_multiplier=0.5",
                                    "privacy.sampling='none'", "privacy.delta=1e-3", "federation.fraction_evaluate=0"]])
def test_a_plain_flower_clientapp_works_through_the_adapter(tmp_path, extra):
    from stamen.server.loop import run_federation

    cfg = load(overrides=TINY + ["federation.fraction_evaluate=0.5"] + extra)
    app = adapt(plain_client_app(cfg), num_examples=_sizes(cfg))
    summary = run_federation(AppGrid(cfg, app), cfg, tmp_path / "run")
    rows = stamen.load_run(tmp_path / "run").rows
    assert [r["rejected"] for r in rows] == [0, 0, 0] and all(r["clients"] == 4 for r in rows)
    if "privacy.clip=1.0" not in extra:
        assert summary["final_test_accuracy"] > 0.3 and rows[-1]["federated_eval_accuracy"] is not None


def test_the_adapter_refuses_what_needs_stamens_own_client(tmp_path):
    from stamen.server.loop import run_federation

    cfg = load(overrides=TINY + ["strategy.name=fat"])
    app = adapt(plain_client_app(cfg), num_examples=_sizes(cfg))
    run_federation(AppGrid(cfg, app), cfg, tmp_path / "run")
    rows = stamen.load_run(tmp_path / "run").rows
    assert all(r["rejected_reasons"] == {"client-error": 4} and r["failed"] for r in rows)


def test_a_plain_clientapp_without_the_adapter_stops_the_run_with_a_clear_error(tmp_path):
    from stamen.server.loop import run_federation

    cfg = load(overrides=TINY)
    # the in-process grid describes its partitions itself (no discovery query), so round 1 is where
    # the server first hears the foreign app; a deployment stops at the discovery query instead
    with pytest.raises(RuntimeError, match="0 of 4 replies were Stamen replies — is the ClientApp a Stamen app"):
        run_federation(AppGrid(cfg, plain_client_app(cfg)), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.npz").exists()  # nothing was trained or saved


def test_stamens_clientapp_refuses_a_plain_flower_instruction():
    """Flower's stock FedAvg sends weights and server-round only: Stamen's client answers with an error
    that names the schema, instead of training and returning a delta FedAvg would average as weights."""
    from flwr.serverapp.strategy import FedAvg

    from stamen.client.app import make_client_app

    cfg = load(overrides=TINY)
    grid = InProcessGrid(cfg)
    task = load_task(cfg.task, 4, 0)
    messages = FedAvg(min_available_nodes=4).configure_train(1, S.to_array_record(task.initial_weights()),
                                                            ConfigRecord(), grid)
    client = make_client_app(cfg)
    replies = [_call(client, m, grid) for m in messages]
    assert len(replies) == 4 and all(r.has_error() for r in replies)
    assert all("not a Stamen train instruction" in r.error.reason for r in replies)


def _call(app, message, grid):
    from flwr.app import Error

    try:
        return app(message, grid.contexts[message.metadata.dst_node_id])
    except Exception as err:
        return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)


@pytest.mark.slow
def test_interop_in_a_real_flower_simulation(tmp_path):
    """Flower's simulation engine on Ray, both directions: a plain ClientApp behind the adapter under
    Stamen's ServerApp trains; Stamen's ClientApp under Flower's stock FedAvg refuses with an error."""
    import sys

    import ray.cloudpickle
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from stamen.client.app import make_client_app
    from stamen.experiment import backend_config
    from stamen.server.app import make_server_app

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's ClientApp travels by value
    cfg = load(overrides=TINY + ["federation.virtual_clients=false"])
    result: dict = {}
    run_simulation(server_app=make_server_app(cfg, tmp_path / "adapted", result=result),
                   client_app=adapt(plain_client_app(cfg), num_examples=_sizes(cfg)), num_supernodes=4,
                   backend_config=backend_config(cfg))
    assert "error" not in result, result.get("error")
    rows = stamen.load_run(tmp_path / "adapted").rows
    assert [r["rejected"] for r in rows] == [0, 0, 0] and result["summary"]["final_test_accuracy"] > 0.3

    seen: dict = {}
    stock = ServerApp()

    @stock.main()
    def main(grid, context):
        task = load_task(cfg.task, 4, 0)
        # min_train_nodes too: Flower samples before every node registered otherwise (DESIGN.md)
        messages = FedAvg(min_available_nodes=4, min_train_nodes=4).configure_train(
            1, S.to_array_record(task.initial_weights()), ConfigRecord(), grid)
        seen["replies"] = [r.error.reason if r.has_error() else "ok" for r in grid.send_and_receive(messages)]

    run_simulation(server_app=stock, client_app=make_client_app(cfg), num_supernodes=4,
                   backend_config=backend_config(cfg))
    assert len(seen["replies"]) == 4 and all("not a Stamen train instruction" in r for r in seen["replies"])
