"""Codecs: round trips, unbiasedness, error feedback, mergeability and payload validation.

Parametrised over every registered general-purpose codec (``CODECS`` entries with
``general_purpose``; a strategy's private wire format such as ``fedkseed``, registered when its
client module is imported, is tested with its strategy), so a new codec module gets the
malformed-payload and property tests for free. Monte-Carlo tolerances are five standard
errors estimated from the samples (fixed seeds: deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stamen.core import Layout
from stamen.sketching.codec import CODECS, Codec, CodecContext, PayloadError, make_codec
from stamen.sketching.codecs_sketch import SketchCodec, cached_operator

make_codec("dense")  # loads every codecs_*.py module, filling CODECS
ALL_CODECS = sorted(name for name, cls in CODECS.items() if cls.general_purpose)
SKETCHES = sorted(name for name in ALL_CODECS if issubclass(CODECS[name], SketchCodec))
LAYOUT = Layout(("conv.weight", "conv.bias", "fc.weight"), ((8, 3, 3, 3), (8,), (4, 72)))  # d = 512
TINY = Layout(("w", "b"), ((2, 3), (4,)))  # d = 10, for the property test


def ctx_for(layout: Layout = LAYOUT, round: int = 1, node: int = 0, seed: int = 42) -> CodecContext:
    return CodecContext(seed=seed, round=round, layout=layout, node=node)


def update(d: int = LAYOUT.d, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def assert_unbiased(samples: torch.Tensor, target: torch.Tensor, what: str) -> None:
    n = samples.shape[0]
    stderr = samples.double().std(dim=0) / math.sqrt(n)
    error = (samples.double().mean(dim=0) - target.double()).abs()
    worst = int((error - 5 * stderr).argmax())
    assert bool((error <= 5 * stderr + 1e-6).all()), \
        f"{what}: coordinate {worst} off by {float(error[worst]):.4g}, 5 SE = {float(5 * stderr[worst]):.4g}"


# -- round trips ----------------------------------------------------------------------------
def test_dense_fp16_round_trips():
    x, ctx = update(), ctx_for()
    dense, fp16 = make_codec("dense"), make_codec("fp16")
    assert torch.equal(dense.decode(dense.encode(x, ctx), ctx), x)
    torch.testing.assert_close(fp16.decode(fp16.encode(x, ctx), ctx), x, rtol=1e-3, atol=1e-4)
    assert Codec.payload_bytes(fp16.encode(x, ctx)) == 2 * LAYOUT.d


def test_int8_round_trip_error_is_within_one_level():
    x, ctx = update(), ctx_for()
    x[LAYOUT.numels[0]:LAYOUT.numels[0] + LAYOUT.numels[1]] *= 1e-3  # a tensor of small values
    codec = make_codec("int8")
    payload = codec.encode(x, ctx)
    assert payload["q"].dtype == np.int8 and payload["scales"].shape == (3,)
    error = (codec.decode(payload, ctx) - x).abs()
    start = 0
    for scale, n in zip(payload["scales"], LAYOUT.numels):  # per-tensor scale: small tensors stay precise
        assert float(error[start:start + n].max()) <= scale / 127 * (1 + 1e-5)
        start += n


def test_int8_is_unbiased():
    x, codec = update(64), make_codec("int8")
    layout = Layout(("a", "b"), ((16, 2), (32,)))
    samples = torch.stack([codec.decode(codec.encode(x, ctx_for(layout, round=r, node=r % 7)), ctx_for(layout))
                           for r in range(1000)])
    assert_unbiased(samples, x, "int8")


def test_int8_draws_from_the_node_generator():
    x, codec = update(), make_codec("int8")
    a = codec.encode(x, ctx_for(node=1))["q"]
    assert np.array_equal(a, codec.encode(x, ctx_for(node=1))["q"])
    assert not np.array_equal(a, codec.encode(x, ctx_for(node=2))["q"])


def test_topk_round_trip_is_exact_on_its_support():
    x, ctx = update(), ctx_for()
    codec = make_codec("topk", k=20)
    payload = codec.encode(x, ctx)
    assert payload["indices"].dtype == np.int32 and np.all(np.diff(payload["indices"]) > 0)
    y = codec.decode(payload, ctx)
    support = torch.from_numpy(payload["indices"].astype(np.int64))
    assert torch.equal(y[support], x[support]) and int((y != 0).sum()) == 20
    assert float(x[support].abs().min()) >= float(x.abs().sort(descending=True).values[19])
    assert make_codec("topk").k_for(LAYOUT.d) == 5  # default ratio 0.01


def test_topk_error_feedback_conserves_the_sum():
    """Σ_t sent_t + final residual = Σ_t update_t."""
    codec, ctx, state = make_codec("topk", ratio=0.05), ctx_for(), {}
    sent = torch.zeros(LAYOUT.d, dtype=torch.float64)
    total = torch.zeros(LAYOUT.d, dtype=torch.float64)
    for r in range(8):
        x = update(seed=r)
        total += x.double()
        sent += codec.decode(codec.encode(x, ctx_for(round=r), state), ctx).double()
    residual = torch.from_numpy(state[codec.STATE_KEY]).double()
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-5)
    assert float(residual.abs().sum()) > 0


def test_topk_without_error_feedback_keeps_no_state():
    state = {}
    make_codec("topk", error_feedback=False).encode(update(), ctx_for(), state)
    assert state == {}
    with pytest.raises(ValueError, match="layout changed"):
        make_codec("topk").encode(update(), ctx_for(), {"topk.residual": np.zeros(3, np.float32)})


@pytest.mark.parametrize("name", SKETCHES)
def test_sketch_decode_is_unbiased_over_rounds(name):
    """Each round draws a fresh operator; the average decode converges to the update."""
    layout = Layout(("w",), ((16,),))
    x, codec = update(16), make_codec(name, size=6)
    samples = torch.stack([codec.decode(codec.encode(x, ctx_for(layout, round=r)), ctx_for(layout, round=r))
                           for r in range(600)])
    assert_unbiased(samples, x, name)


def test_countsketch_adjoint_decode_is_unbiased_and_linear():
    layout = Layout(("w",), ((16,),))
    x, codec = update(16), make_codec("countsketch", size=6, rows=3)
    samples = torch.stack([codec.adjoint_decode(codec.encode(x, ctx_for(layout, round=r)), ctx_for(layout, round=r))
                           for r in range(600)])
    assert_unbiased(samples, x, "countsketch adjoint")


@pytest.mark.parametrize("name", ALL_CODECS)
def test_every_codec_round_trips_to_a_finite_vector(name):
    codec, ctx = make_codec(name), ctx_for()
    y = codec.decode(codec.encode(update(), ctx, {}), ctx)
    assert y.shape == (LAYOUT.d,) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())


# -- linearity and merging -------------------------------------------------------------------
@pytest.mark.parametrize("name", SKETCHES)
def test_sketch_payloads_merge_before_decoding(name):
    codec, ctx = make_codec(name), ctx_for()
    a, b = codec.encode(update(seed=1), ctx), codec.encode(update(seed=2), ctx)
    merged = codec.combine([a, b], ctx, weights=[0.25, 0.75])
    torch.testing.assert_close(merged[codec.payload_key], 0.25 * a[codec.payload_key] + 0.75 * b[codec.payload_key])
    x_ab = 0.25 * update(seed=1) + 0.75 * update(seed=2)
    torch.testing.assert_close(merged[codec.payload_key], codec.encode(x_ab, ctx)[codec.payload_key], rtol=1e-4, atol=1e-4)
    if codec.linear:
        torch.testing.assert_close(codec.decode(merged, ctx),
                                   0.25 * codec.decode(a, ctx) + 0.75 * codec.decode(b, ctx), rtol=1e-4, atol=1e-4)


def test_linear_flags():
    assert {name for name in ALL_CODECS if CODECS[name].linear} >= {"dense", "gaussian", "rademacher", "srht", "sparsejl"}
    assert not any(CODECS[name].linear for name in ("fp16", "int8", "topk", "countsketch"))


def test_countsketch_server_side_topk_unsketch():
    """FetchSGD-style: clients send tables, the server sums them and extracts heavy hitters."""
    d = 4000
    layout = Layout(("w",), ((d,),))
    codec, ctx = make_codec("countsketch", size=400, rows=5), ctx_for(layout, round=3)
    heavy = torch.tensor([7, 1000, 2500, 3999])
    clients = []
    for c in range(4):
        x = 0.05 * update(d, seed=c)
        x[heavy] += torch.tensor([10.0, -8.0, 6.0, 12.0])
        clients.append(x)
    total = codec.combine([codec.encode(x, ctx_for(layout, round=3, node=i)) for i, x in enumerate(clients)], ctx)
    indices, values = codec.unsketch_topk(total, ctx, 4)
    assert torch.equal(indices, heavy)
    torch.testing.assert_close(values, sum(clients)[heavy], rtol=0, atol=1.0)
    dense = codec.decode_topk(total, ctx, 4)
    assert int((dense != 0).sum()) == 4


def test_operator_cached_within_a_round_and_renewed_across_rounds():
    codec = make_codec("countsketch")
    a, b, c = codec.operator(ctx_for(round=5)), codec.operator(ctx_for(round=5)), codec.operator(ctx_for(round=6))
    assert a is b and c is not a and c.fingerprint() != a.fingerprint()
    assert make_codec("countsketch").operator(ctx_for(round=6)) is c  # shared across codec instances
    assert cached_operator("srht", 100, 10, 1) is cached_operator("srht", 100, 10, 1)


def test_gaussian_codec_refuses_large_d_clearly():
    huge = Layout(("w",), ((10_000_000,),))
    with pytest.raises(ValueError, match=r"d=10000000, s=1000000"):
        make_codec("gaussian").operator(ctx_for(huge))


def test_codec_options_are_validated():
    for name, options in [("topk", {"ratio": 0.1, "k": 3}), ("topk", {"ratio": 2.0}), ("srht", {"size": 0}),
                          ("srht", {"rows": 3}), ("countsketch", {"rows": 0}), ("gaussian", {"nope": 1}),
                          ("fp16", {"ratio": 0.1})]:
        with pytest.raises(ValueError):
            make_codec(name, **options)


def test_fp16_refuses_values_it_cannot_represent():
    x = update()
    x[3] = 1e6
    with pytest.raises(ValueError, match="float16 maximum"):
        make_codec("fp16").encode(x, ctx_for())


# -- malformed payloads ----------------------------------------------------------------------
def valid_payload(name: str, layout: Layout = LAYOUT) -> dict[str, np.ndarray]:
    return make_codec(name).encode(update(layout.d, seed=9), ctx_for(layout), {})


def malformed_variants(payload: dict[str, np.ndarray]) -> dict[str, object]:
    """Generic corruptions every decoder must reject."""
    key = sorted(payload)[0]
    variants: dict[str, object] = {
        "not a dict": list(payload.values()),
        "missing key": {k: v for k, v in payload.items() if k != key},
        "extra key": {**payload, "surprise": np.zeros(3, np.float32)},
        "empty": {},
    }
    for k, arr in payload.items():
        variants[f"{k} truncated"] = {**payload, k: arr.reshape(-1)[:-1]}
        variants[f"{k} wrong dtype"] = {**payload, k: arr.astype(np.float64 if arr.dtype != np.float64 else np.float32)}
        variants[f"{k} extra dim"] = {**payload, k: arr[None]}
        if arr.dtype.kind == "f":
            bad = arr.copy()
            bad.reshape(-1)[0] = np.nan
            variants[f"{k} NaN"] = {**payload, k: bad}
            bad = arr.copy()
            bad.reshape(-1)[-1] = np.inf
            variants[f"{k} inf"] = {**payload, k: bad}
    return variants


@pytest.mark.parametrize("name", ALL_CODECS)
def test_malformed_payloads_raise_payload_error(name):
    codec, ctx = make_codec(name), ctx_for()
    for what, payload in malformed_variants(valid_payload(name)).items():
        with pytest.raises(PayloadError):
            codec.decode(payload, ctx)
            pytest.fail(f"{name}: {what} was accepted")


def test_codec_specific_invalid_values():
    ctx = ctx_for()
    topk = valid_payload("topk")
    for bad_indices in (np.array([-1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, LAYOUT.d]), np.array([1, 1, 3, 4, 5])):
        with pytest.raises(PayloadError, match="indices"):
            make_codec("topk").decode({**topk, "indices": bad_indices.astype(np.int32)}, ctx)
    with pytest.raises(PayloadError, match="int32 or int64"):
        make_codec("topk").decode({**topk, "indices": topk["indices"].astype(np.uint32)}, ctx)
    int8 = valid_payload("int8")
    with pytest.raises(PayloadError, match="negative"):
        make_codec("int8").decode({**int8, "scales": -int8["scales"]}, ctx)
    q = int8["q"].copy()
    q[0] = -128
    with pytest.raises(PayloadError, match="-127"):
        make_codec("int8").decode({**int8, "q": q}, ctx)
    with pytest.raises(PayloadError, match="too large"):  # finite payload whose de-sketch overflows
        make_codec("srht").decode({"sketch": np.full(51, 3e38, np.float32)}, ctx)


# -- property test: arbitrary payloads decode or raise PayloadError -------------------------
_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.bool_]


@st.composite
def arbitrary_payloads(draw, name: str):
    """Dicts of small arrays: valid payloads with some arrays replaced, or anything at all."""
    valid = valid_payload(name, TINY)
    keys = sorted(valid) + ["values", "sketch", "junk"]
    shapes = sorted({a.shape for a in valid.values()} | {(0,), (1,), (TINY.d,), (2, 5), ()})
    any_array = st.builds(lambda dtype, shape: (dtype, shape), st.sampled_from(_DTYPES), st.sampled_from(shapes)).flatmap(
        lambda ds: hnp.arrays(ds[0], ds[1]))
    if draw(st.booleans()):
        payload = dict(valid)
        for key in draw(st.lists(st.sampled_from(sorted(valid)), unique=True)):
            same = hnp.arrays(valid[key].dtype, valid[key].shape)  # right dtype/shape, arbitrary values
            payload[key] = draw(st.one_of(same, any_array))
        if draw(st.booleans()):
            payload.pop(draw(st.sampled_from(sorted(payload))))
        return payload
    return draw(st.dictionaries(st.sampled_from(keys), any_array, max_size=4))


@pytest.mark.parametrize("name", ALL_CODECS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_returns_finite_vector_or_raises_payload_error(name, data):
    payload = data.draw(arbitrary_payloads(name))
    ctx = ctx_for(TINY)
    try:
        out = make_codec(name).decode(payload, ctx)
    except PayloadError:
        return
    assert isinstance(out, torch.Tensor) and out.shape == (TINY.d,) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kind", ["random", "sorted", "constant", "sparse"])
def test_topk_selection_is_exact_on_large_inputs(kind):
    """The sampled-threshold path of largest_magnitude finds a true top-k set, ties included."""
    from stamen.sketching.codecs_quant import largest_magnitude

    d, k = 300_000, 3000
    x = {"random": update(d), "sorted": torch.linspace(-1, 1, d), "constant": torch.ones(d),
         "sparse": torch.zeros(d).index_fill_(0, torch.arange(0, d, 211), 2.0)}[kind]
    chosen = largest_magnitude(x, k)
    kth = torch.topk(x.abs(), k).values.min()
    assert chosen.numel() == k and chosen.unique().numel() == k and bool((chosen.diff() > 0).all())
    assert bool((x.abs()[chosen] >= kth).all())


def test_strategy_internal_wire_formats_are_not_general_purpose():
    """``fedkseed`` (registered by its client module) encodes only its trainer's coefficients: it must not
    enter the generic tests above, whichever test module imported it first."""
    import stamen.client.trainers_ferret  # noqa: F401  (registers the fedkseed encoder)

    assert "fedkseed" in CODECS and not CODECS["fedkseed"].general_purpose
    assert "fedkseed" not in ALL_CODECS
    assert all(CODECS[name].general_purpose for name in ("dense", "fp16", "int8", "topk", "srht", "countsketch", "ferret"))
