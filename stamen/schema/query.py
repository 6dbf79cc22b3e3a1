"""Query messages: node discovery and plugin queries.

**Discovery** (``config`` without ``query``): the node replies with ``meta`` = its
``partition-id`` and the schema version, and ``metrics`` = ``num-examples``, the size of its
partition. The server binds each partition to the node that reported it and, in deployment,
bounds every later ``num-examples`` claim of that node by the size it reported here
(and by ``federation.max_examples_per_client`` when set).

**Plugin queries** (``config["query"]`` names a handler the client registered): the
instruction carries the identity entries of :mod:`stamen.schema`; the reply echoes them in
``meta``. ``curriculum-score``: ``metrics`` = ``client-score``, the mean difficulty of the
client's examples under the global model (client/trainers_curriculum.py).
"""

from __future__ import annotations

QUERY = "query"  # config entry naming the client's query handler; absent: discovery
CURRICULUM_SCORE_QUERY = "curriculum-score"
