"""Gradient inversion on 8×8 digits: raw gradients leak, a known sketch still leaks, strong noise stops it.

Thresholds (PSNR on [0, 1] images): an attack *succeeds* above 30 dB (visually exact on 8×8);
it *fails* below 10 dB, i.e. worse than guessing the dataset's mean digit (11.4 dB on these
images; all-zeros scores 6.5 dB, uniform noise 5.8 dB). Measured with these settings:
raw DLG/iDLG ≈ 120 dB (the cap: fp32-exact), raw IG ≈ 70 dB, Gaussian sketch s = d/4 the same,
clip 1 + noise std 1 ≈ 4–6 dB.
"""

from __future__ import annotations

import math

import pytest
import torch

from stamen.privacy.attacks import (
    dlg_attack,
    gaussian_projection,
    infer_labels,
    inverting_gradients_attack,
    label_accuracy,
    linear_adjoint,
    model_gradient,
    mse,
    psnr,
    run_attack_trials,
    total_variation,
)
from stamen.privacy.attacks.gradient_inversion import match_reconstructions, sigmoid_mlp

SUCCESS_DB = 30.0
FAILURE_DB = 10.0
ITERATIONS = 200


@pytest.fixture(autouse=True)
def single_thread():
    """The models are tiny; OpenMP threads only add contention (tenfold slowdowns on busy 2-core hosts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images[:40], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target[:40], dtype=torch.int64)


@pytest.fixture(scope="module")
def model():
    return sigmoid_mlp((1, 8, 8), 10, hidden=16, seed=0)


def _d(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- label inference -----------------------------------------------------------------------

def test_idlg_reads_the_label_of_a_single_sample(digits, model):
    images, labels = digits
    predicted = [int(infer_labels(model, model_gradient(model, images[i:i + 1], labels[i:i + 1])))
                 for i in range(len(labels))]
    assert predicted == labels.tolist()


def test_idlg_through_a_known_sketch_uses_the_adjoint(digits, model):
    images, labels = digits
    project = gaussian_projection(_d(model), _d(model) // 4, seed=1)
    predicted = []
    for i in range(20):
        sketch = project(model_gradient(model, images[i:i + 1], labels[i:i + 1]))
        predicted.append(int(infer_labels(model, linear_adjoint(project, sketch, _d(model)))))
    assert label_accuracy(labels[:20], torch.tensor(predicted)) >= 0.95


def test_linear_adjoint_is_the_transpose():
    matrix = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    y = torch.randn(5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(linear_adjoint(lambda v: matrix @ v, y, 7), matrix.T @ y, atol=1e-6)


# -- raw gradients leak --------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["dlg", "ig"])
def test_attack_recovers_input_from_raw_gradient(digits, model, attack):
    images, labels = digits
    result = run_attack_trials(model, images[:2], labels[:2], attack=attack, seeds=(0,), iterations=ITERATIONS)
    assert result["trials"] == 2
    assert result["psnr_min"] > SUCCESS_DB
    assert result["label_accuracy"] == 1.0


def test_original_dlg_with_soft_labels_also_recovers(digits, model):
    images, labels = digits
    result = run_attack_trials(model, images[:1], labels[:1], attack="dlg", seeds=(0,), iterations=ITERATIONS,
                               infer_label=False)
    assert result["psnr"] > SUCCESS_DB
    assert result["label_accuracy"] == 1.0


def test_batch_of_two_with_distinct_labels(digits, model):
    images, labels = digits  # labels 0 and 1
    result = run_attack_trials(model, images[:2], labels[:2], attack="dlg", seeds=(0,), batch_size=2,
                               iterations=ITERATIONS)
    assert result["psnr"] > SUCCESS_DB
    assert result["label_accuracy"] == 1.0


# -- a known sketch still leaks when s is large enough ------------------------------------

@pytest.mark.parametrize("attack", ["dlg", "ig"])
def test_attack_recovers_input_through_known_gaussian_sketch(digits, model, attack):
    images, labels = digits
    project = gaussian_projection(_d(model), _d(model) // 4, seed=1)  # s = 302 of d = 1210
    result = run_attack_trials(model, images[2:4], labels[2:4], attack=attack, seeds=(0,), project=project,
                               iterations=ITERATIONS)
    assert result["projected"]
    assert result["psnr_min"] > SUCCESS_DB


def test_attack_fails_when_the_sketch_is_tiny(digits, model):
    """s = 16 < 64 unknown pixels: the sketch no longer pins down the input."""
    images, labels = digits
    project = gaussian_projection(_d(model), 16, seed=1)
    result = run_attack_trials(model, images[:2], labels[:2], attack="dlg", seeds=(0,), project=project,
                               iterations=ITERATIONS)
    assert result["psnr"] < SUCCESS_DB


# -- enough noise stops it -----------------------------------------------------------------

@pytest.mark.parametrize("attack", ["dlg", "ig"])
def test_attack_fails_under_strong_noise(digits, model, attack):
    """Clip to C = 1 and add N(0, (zC)²) with z = 1, as local DP would: the input is not recovered."""
    images, labels = digits
    result = run_attack_trials(model, images[:2], labels[:2], attack=attack, seeds=(0,), clip_norm=1.0,
                               noise_std=1.0, iterations=ITERATIONS)
    assert result["psnr_max"] < FAILURE_DB


def test_noise_in_sketch_space_also_stops_it(digits, model):
    images, labels = digits
    project = gaussian_projection(_d(model), _d(model) // 4, seed=1)
    result = run_attack_trials(model, images[:2], labels[:2], attack="ig", seeds=(0,), project=project,
                               clip_norm=1.0, noise_std=1.0, noise_site="observed", iterations=ITERATIONS)
    assert result["psnr_max"] < FAILURE_DB


# -- metrics and hygiene -------------------------------------------------------------------

def test_metrics():
    x = torch.zeros(2, 1, 8, 8)
    assert mse(x, x + 0.1) == pytest.approx(0.01)
    assert psnr(x, x + 0.1) == pytest.approx(20.0)
    assert psnr(x, x + 0.2, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.04))
    assert psnr(x, x) == pytest.approx(120.0)  # capped so that averages stay finite
    assert label_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    assert total_variation(torch.ones(1, 1, 4, 4)) == 0.0
    checker = (torch.arange(16).reshape(4, 4) % 2).float().reshape(1, 1, 4, 4)
    assert float(total_variation(checker)) == pytest.approx(1.0)


def test_reconstructions_are_matched_to_originals():
    a, b, c = torch.zeros(4), torch.ones(4), torch.full((4,), 0.5)
    assert match_reconstructions(torch.stack([a, b, c]), torch.stack([c, a, b])) == [1, 2, 0]


def test_attacks_use_only_the_given_generator(digits, model):
    images, labels = digits
    target = model_gradient(model, images[:1], labels[:1])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = inverting_gradients_attack(model, target, (1, 8, 8), 10, generator=torch.Generator().manual_seed(3),
                                       iterations=20)
    second = inverting_gradients_attack(model, target, (1, 8, 8), 10, generator=torch.Generator().manual_seed(3),
                                        iterations=20)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first.inputs, second.inputs)


def test_attack_argument_errors(model):
    with pytest.raises(ValueError, match="flat"):
        dlg_attack(model, torch.zeros(2, 3), (1, 8, 8), 10, generator=torch.Generator())
    with pytest.raises(TypeError, match="Generator"):
        dlg_attack(model, torch.zeros(_d(model)), (1, 8, 8), 10, generator=None)
    with pytest.raises(ValueError, match="data_range"):
        dlg_attack(model, torch.zeros(_d(model)), (1, 8, 8), 10, generator=torch.Generator(), data_range=(1, 0))
    with pytest.raises(ValueError, match="gradient has"):
        infer_labels(model, torch.zeros(3))
    with pytest.raises(ValueError, match="attack"):
        run_attack_trials(model, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64), attack="gan")
