"""Stamen's ClientApp, except on the node whose node config has ``attack=1`` (test only).

That node trains honestly (``stamen.client.app.handle_train``) and then tampers with its reply,
one attack per round, cycling:

- round 1, 4, …: **forged partition** — the reply names another partition's id;
- round 2, 5, …: **inflated weight** — ``num-examples`` = 1e12;
- round 3, 6, …: **replay** — it sends its previous round's (honest) reply again.

Its previous reply lives in ``context.state`` (the SuperNode keeps it across rounds; each
message runs in a fresh ClientApp process, so a module variable would not survive). Every
other node, and every evaluate / query message, is handled exactly as Stamen does.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stamen import schema as S
from stamen.client.app import handle_evaluate, handle_query, handle_train
from stamen.config import from_flat

ATTACKS = ("forge-partition", "inflate-examples", "replay-previous-round")
INFLATED = 1e12
_KEPT = {S.UPDATE: "malicious.update", S.METRICS: "malicious.metrics", S.META: "malicious.meta"}

app = ClientApp()


def attacker(context: Context) -> bool:
    return str(context.node_config.get("attack", "0")).lower() in ("1", "true", "yes")


def attack_for(server_round: int) -> str:
    return ATTACKS[(server_round - 1) % len(ATTACKS)]


def _keep(context: Context, content: RecordDict) -> None:
    """Remember an honest reply's records (copies) for a later replay."""
    context.state[_KEPT[S.UPDATE]] = ArrayRecord(dict(content.array_records[S.UPDATE].items()))
    context.state[_KEPT[S.METRICS]] = MetricRecord(dict(content.metric_records[S.METRICS]))
    context.state[_KEPT[S.META]] = ConfigRecord(dict(content.config_records[S.META]))


def _kept(context: Context) -> RecordDict | None:
    if _KEPT[S.META] not in context.state.config_records:
        return None
    return RecordDict({S.UPDATE: context.state.array_records[_KEPT[S.UPDATE]],
                       S.METRICS: context.state.metric_records[_KEPT[S.METRICS]],
                       S.META: context.state.config_records[_KEPT[S.META]]})


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = handle_train(from_flat(dict(context.run_config)), msg, context)
    if not attacker(context):
        return reply
    server_round = int(msg.content.config_records[S.CONFIG][S.SERVER_ROUND])
    previous = _kept(context)
    _keep(context, reply.content)
    attack = attack_for(server_round)
    if attack == "forge-partition":
        meta = reply.content.config_records[S.META]
        meta[S.PARTITION_ID] = (int(meta[S.PARTITION_ID]) + 1) % int(context.node_config["num-partitions"])
    elif attack == "inflate-examples":
        reply.content.metric_records[S.METRICS][S.NUM_EXAMPLES] = INFLATED
    elif previous is not None:  # replay: last round's reply, as an answer to this round's message
        reply = Message(content=previous, reply_to=msg)
    print(f"malicious node (partition-id {context.node_config['partition-id']}): round {server_round}: {attack}",
          flush=True)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(from_flat(dict(context.run_config)), msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(from_flat(dict(context.run_config)), msg, context)
