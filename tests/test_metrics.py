"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from codir_ds.data.metrics import compute_metrics
from codir_ds.errors import CodirError


def test_accuracy():
    assert compute_metrics(["accuracy"], [1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 0.5}


def test_binary_f1_positive_class_one():
    # preds 1 1 1 0 0 0 / labels 1 0 1 1 0 0: tp=2, fp=1, fn=1 -> P=R=2/3 -> F1 = 2/3
    out = compute_metrics(["f1", "accuracy"], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0])
    assert list(out) == ["f1", "accuracy"]
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # tp=1, fp=0, fn=2 -> P=1, R=1/3 -> F1 = 2*(1/3)/(4/3) = 0.5
    assert compute_metrics(["f1"], [1, 0, 0, 0], [1, 1, 1, 0])["f1"] == pytest.approx(0.5)
    # No positives anywhere: F1 undefined, reported as 0.
    assert compute_metrics(["f1"], [0, 0], [0, 0])["f1"] == 0.0


def test_macro_f1_three_classes():
    # labels 0 0 1 1 2 2 / preds 0 1 1 1 2 0
    # class 0: tp=1 fp=1 fn=1 -> 1/2; class 1: tp=2 fp=1 fn=0 -> 4/5; class 2: tp=1 fp=0 fn=1 -> 2/3
    out = compute_metrics(["f1"], [0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert out["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_mcc_binary_and_multiclass():
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert compute_metrics(["mcc"], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0])["mcc"] == pytest.approx(1 / 3)
    assert compute_metrics(["mcc"], [0, 1, 0, 1], [0, 1, 0, 1])["mcc"] == pytest.approx(1.0)
    assert compute_metrics(["mcc"], [1, 0, 1, 0], [0, 1, 0, 1])["mcc"] == pytest.approx(-1.0)
    # Constant predictions: undefined, reported as 0.
    assert compute_metrics(["mcc"], [1, 1, 1], [0, 1, 0])["mcc"] == 0.0
    # Multi-class (Gorodkin): labels 0 0 1 1 2 2, preds 0 1 1 1 2 0.
    # c=4, s=6, t=(2,2,2), p=(2,3,1): cov = 4*6 - (4+6+2) = 12; s^2 - p.p = 36-14 = 22; s^2 - t.t = 36-12 = 24
    expected = 12 / math.sqrt(22 * 24)
    assert compute_metrics(["mcc"], [0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])["mcc"] == pytest.approx(expected)


def test_pearson_and_spearman():
    # x = 1 2 3 4, y = 2 4 5 9: deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4): cov-sum = 4.5+0.5+0+6 = 11
    # sum sq: 5 and 26 -> r = 11 / sqrt(130)
    out = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert out["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert out["spearman"] == pytest.approx(1.0)  # monotone
    # Ranks of y = 3 1 2 against x ranks 1 2 3: d = (2,-1,-1) -> 1 - 6*6/(3*8) = -0.5
    assert compute_metrics(["spearman"], [1.0, 2.0, 3.0], [30.0, 10.0, 20.0])["spearman"] == pytest.approx(-0.5)
    # Constant predictions: undefined, reported as 0 so best-checkpoint selection never sees NaN.
    assert compute_metrics(["pearson", "spearman"], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }


def test_inputs_numpy_torch_and_column_vectors():
    preds = torch.tensor([[0.5], [1.5], [2.5]], dtype=torch.bfloat16)
    out = compute_metrics(["pearson"], preds, np.array([1.0, 2.0, 3.0]))
    assert out["pearson"] == pytest.approx(1.0)
    assert compute_metrics(["accuracy"], torch.tensor([1, 2]), torch.tensor([1, 1]))["accuracy"] == 0.5


def test_bad_inputs():
    with pytest.raises(CodirError, match="unknown metric.*'auc'.*accuracy"):
        compute_metrics(["auc"], [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics(["accuracy"], [1, 0], [1])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(["accuracy"], [], [])
