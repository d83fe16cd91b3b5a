"""Tests for detres.models.detection.sampler: positive cap, negative filling, ignore handling, seeding."""

import pytest
import torch

from detres.models.detection.sampler import BalancedSampler


def _labels(num_pos: int, num_neg: int, num_ignore: int) -> torch.Tensor:
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignore)]).long()
    return labels[torch.randperm(labels.numel())]


@pytest.mark.parametrize(
    "num_pos,num_neg,expected_pos,expected_neg",
    [
        (10, 1000, 10, 246),  # few positives: negatives fill the batch
        (300, 1000, 128, 128),  # many positives: capped at 50%
        (200, 20, 128, 20),  # few negatives: batch is smaller, positives still capped
        (0, 50, 0, 50),
    ],
)
def test_counts(num_pos, num_neg, expected_pos, expected_neg):
    torch.manual_seed(0)
    labels = _labels(num_pos, num_neg, 77)
    pos, neg = BalancedSampler(256, 0.5)([labels])
    assert int(pos[0].sum()) == expected_pos
    assert int(neg[0].sum()) == expected_neg
    # Masks select only the right kind, never ignored entries, and never overlap.
    assert bool((labels[pos[0]] == 1).all())
    assert bool((labels[neg[0]] == 0).all())
    assert not bool((pos[0] & neg[0]).any())


def test_class_labels_count_as_positive_and_per_image_lists():
    labels = [torch.tensor([3, 0, -1, 1, 0]), torch.tensor([0, 0, 0])]
    pos, neg = BalancedSampler(8, 0.5)(labels)
    assert pos[0].tolist() == [True, False, False, True, False]
    assert neg[0].tolist() == [False, True, False, False, True]
    assert pos[1].tolist() == [False] * 3 and neg[1].tolist() == [True] * 3


def test_seeded_and_random():
    labels = _labels(100, 400, 0)
    sampler = BalancedSampler(64, 0.25)
    torch.manual_seed(123)
    a = sampler([labels])
    torch.manual_seed(123)
    b = sampler([labels])
    c = sampler([labels])
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    assert int(a[0][0].sum()) == 16 and int(a[1][0].sum()) == 48
    assert not torch.equal(a[0][0], c[0][0])


def test_sampling_is_roughly_uniform():
    torch.manual_seed(0)
    labels = torch.ones(20, dtype=torch.long)
    sampler = BalancedSampler(10, 0.5)  # picks 5 of 20 positives each call
    counts = torch.zeros(20)
    for _ in range(400):
        counts += sampler([labels])[0][0].float()
    # Expected 100 each; a biased sampler (e.g. always the first 5) would fail badly.
    assert counts.min() > 60 and counts.max() < 140


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(256, 1.5)
    with pytest.raises(ValueError, match="matched_labels\\[0\\]"):
        BalancedSampler(256, 0.5)([torch.zeros(2, 2)])


def test_a_seeded_image_draws_the_same_sample_whatever_the_batch_and_global_state():
    labels = [torch.tensor([1] * 30 + [0] * 70), torch.tensor([1] * 5 + [0] * 200)]
    rpn, roi = BalancedSampler(16, 0.5, stream=1), BalancedSampler(16, 0.5, stream=2)
    torch.manual_seed(0)
    pos, neg = rpn(labels, seeds=[11, 12])
    torch.manual_seed(99)
    pos_alone, neg_alone = rpn(labels[1:], seeds=[12])  # image 1 alone, another global state
    assert torch.equal(pos[1], pos_alone[0]) and torch.equal(neg[1], neg_alone[0])
    again = rpn(labels, seeds=[11, 12])
    assert all(torch.equal(a, b) for a, b in zip(again[0] + again[1], pos + neg))
    other = rpn(labels, seeds=[13, 12])
    assert not torch.equal(other[0][0], pos[0]) and torch.equal(other[0][1], pos[1])
    # the RoI head's stream draws differently from the same image seed
    assert not torch.equal(roi(labels, seeds=[11, 12])[0][0], pos[0])
    assert int(pos[0].sum()) == 8 and int(neg[0].sum()) == 8 and int(pos[1].sum()) == 5 and int(neg[1].sum()) == 11
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        rpn(labels[:1], seeds=[1, 2])
