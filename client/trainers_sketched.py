"""Client side of the compressed downlinks of ``sketched_fedavg`` and ``fetchsgd``.

Both are the catch-up downlink of ``client/catchup.py`` (protocol: ``strategies/catchup.py``);
they differ in the step that applies one missed round's update to the node's copy of the global
model, which is the server's own step (``sketching/downlink.py``):

- ``DOWNLINKS["sketched"]``: round r's update is the mean sketch ȳ_r; w ← w + η_g·R_rᵀ ȳ_r, with
  R_r the codec of the message's ``codec`` / ``codec-options`` entries at round r (the operator
  the clients encoded with that round) and η_g the ``sketched-server-lr`` entry;
- ``DOWNLINKS["fetchsgd"]``: round r's update is a ``topk`` payload (indices, values) of the k
  coordinates the server unsketched; w ← w + Σ values·e_indices.

(A ``trainers_*`` module so that ``load_client_plugins`` registers the downlinks; no trainer here.)
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import RecordDict

from stamen.schema import train as T
from stamen.client.app import DOWNLINKS
from stamen.client.catchup import CatchUpClient
from stamen.client.trainers import TrainJob
from stamen.sketching.codec import Codec, CodecContext, make_codec
from stamen.sketching.downlink import sketch_step, sparse_step

# Message config entries: stamen/schema/train.py
SKETCHED = CatchUpClient("sketched")
FETCHSGD = CatchUpClient("fetchsgd")
SKETCHED_SERVER_LR = T.SKETCHED_SERVER_LR


def sketched_downlink(content: RecordDict, job: TrainJob) -> dict[str, np.ndarray]:
    """The global weights of a ``downlink = "sketched"`` message (dense, or rebuilt from mean sketches)."""
    config, layout = job.options, job.task.layout
    codec: list[Codec] = []  # built on first use (a dense message needs none)

    def step(flat: torch.Tensor, r: int, payload: dict[str, np.ndarray]) -> torch.Tensor:
        if not codec:
            codec.append(make_codec(str(config[T.CODEC]), **json.loads(config[T.CODEC_OPTIONS])))
        ctx = CodecContext(seed=job.seed, round=int(config.get(T.CODEC_ROUND, r)), layout=layout)
        return sketch_step(flat, codec[0], payload, ctx, float(config[SKETCHED_SERVER_LR]))

    return SKETCHED.rebuild(content, config, job.state, layout, step)


def fetchsgd_downlink(content: RecordDict, job: TrainJob) -> dict[str, np.ndarray]:
    """The global weights of a ``downlink = "fetchsgd"`` message (dense, or rebuilt from top-k updates)."""
    layout = job.task.layout

    def step(flat: torch.Tensor, r: int, payload: dict[str, np.ndarray]) -> torch.Tensor:
        return sparse_step(flat, payload, CodecContext(seed=job.seed, round=r, layout=layout))

    return FETCHSGD.rebuild(content, job.options, job.state, layout, step)


DOWNLINKS[SKETCHED.prefix] = sketched_downlink
DOWNLINKS[FETCHSGD.prefix] = fetchsgd_downlink
