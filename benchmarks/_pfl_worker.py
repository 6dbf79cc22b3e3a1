"""Apple's pfl (pfl-research) 0.6 running the ``sim_throughput`` workload.

Run by ``sim_throughput`` with the Python of a side virtualenv that has ``pfl==0.6.0`` and
``torch==2.13.0`` (Stamen is not installed there: only ``_sim_workload.py`` is imported, by
path):

    PY benchmarks/_pfl_worker.py --workload W.npz --report R.jsonl --rounds 20            # 1 process
    PY -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/_pfl_worker.py ...   # 2 workers

pfl's simulation as its tutorials write it: ``FederatedAveraging`` with ``SimulatedBackend``
(weighted by data points), a ``PyTorchModel`` (local plain SGD, central SGD with lr 1, i.e.
w ← w + mean Δ), a ``FederatedDataset`` and ``CentralEvaluationCallback`` every round. Under
``torchrun`` pfl splits each cohort over the workers and all-reduces the summed statistics
(gloo on CPU), and splits the central evaluation too.

So that pfl trains the very clients and batches the other systems do, its user sampler returns
the round's cohort by Stamen's rule (``_sim_workload.cohort``) as ``(round, partition)`` ids,
and ``make_dataset_fn`` hands pfl the client's samples in that round's batch order (pfl's
``Dataset`` batches in order, without shuffling). pfl also evaluates each user's data before
and after local training in its first iteration (``do_evaluation`` at iteration 0); that cost is
in its start-up. Only rank 0 writes the report.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _sim_workload as W  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class PflMLP(W.MLP):
    """The workload's MLP with the ``loss`` and ``metrics`` methods pfl's PyTorchModel asks for."""

    def loss(self, x, y, eval=False):  # noqa: A002 - pfl's keyword
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits, y = self(x), y.long()
        return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), len(y)),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), len(y))}


class RoundSchedule:
    """pfl's user sampler: the current round's cohort, as ``(round, partition)`` ids, in order.

    pfl calls the sampler once per user per worker (each worker keeps the users at its rank's
    positions); the timing callback moves the schedule to the next round after each iteration.
    """

    def __init__(self, seed: int, num_clients: int, fraction: float, rounds: int):
        self.cohorts = [W.cohort(seed, r, num_clients, fraction) for r in range(1, rounds + 1)]
        self.start_round(1)

    def start_round(self, server_round: int) -> None:
        self.round, self.pos = server_round, 0

    def __call__(self):
        c = self.cohorts[min(self.round, len(self.cohorts)) - 1]
        pid = c[self.pos % len(c)]
        self.pos += 1
        return (self.round, pid)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module as get_ops
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    rank = get_ops().distributed.global_rank
    world = get_ops().distributed.world_size
    rep = W.Report(args.report) if rank == 0 else None
    if rep:
        rep.event("start", t_process=T_START, pid=os.getpid(), system=f"pfl x{world}")

    wl = W.load_workload(args.workload)
    m = wl.meta
    seed, n_clients = m["seed"], wl.num_clients
    schedule = RoundSchedule(seed, n_clients, m["fraction"], args.rounds)

    def make_dataset_fn(user_id):
        rnd, pid = user_id
        X, y = wl.client(pid)
        order = W.batch_order(seed, rnd, pid, len(y)).numpy()
        return Dataset(raw_data=[X[order], y[order]], user_id=pid)

    train_data = FederatedDataset(make_dataset_fn, schedule)
    central_data = Dataset(raw_data=[wl.test_X, wl.test_y])

    net = PflMLP(m["inputs"], m["hidden"], m["classes"])
    net.load_state_dict({k: torch.as_tensor(v) for k, v in wl.init.items()})
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    train_params = NNTrainHyperParams(local_learning_rate=m["lr"], local_num_epochs=1,
                                      local_batch_size=m["batch_size"])
    eval_params = NNEvalHyperParams(local_batch_size=512)
    algo_params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                                    train_cohort_size=W.cohort_size(m["fraction"], n_clients), val_cohort_size=None)
    backend = SimulatedBackend(training_data=train_data, val_data=train_data, postprocessors=[WeightByDatapoints()])

    sizes = wl.offsets[1:] - wl.offsets[:-1]

    class RoundTimer(TrainingProcessCallback):
        """Records each round's end (after the central evaluation) and moves the sampler on."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            rnd = central_iteration + 1
            if rep:
                values = aggregate_metrics.to_simple_dict()
                acc = values.get("Central val | accuracy")
                loss = values.get("Central val | loss")
                cohort = schedule.cohorts[rnd - 1]
                rep.round_end(rnd, clients=len(cohort), samples=int(sum(sizes[p] for p in cohort)),
                              test_accuracy=None if acc is None else float(acc),
                              test_loss=None if loss is None else float(loss))
            schedule.start_round(rnd + 1)
            return False, Metrics()

    if rep:
        rep.event("ready")
    FederatedAveraging().run(algorithm_params=algo_params, backend=backend, model=model,
                             model_train_params=train_params, model_eval_params=eval_params,
                             callbacks=[CentralEvaluationCallback(central_data, model_eval_params=eval_params,
                                                                  frequency=1),
                                        RoundTimer()])
    if rep:
        rep.event("end")
        rep.close()
    if world > 1 and torch.distributed.is_initialized():
        # without this a worker may abort at exit ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
