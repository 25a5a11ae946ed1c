import pytest
import torch

from m2d_kernels import schedules


def test_full_grid():
    assert torch.equal(schedules.full_grid(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="n_dims must be a positive int"):
        schedules.full_grid(3, 0)


def test_starbucks_places_pairs_by_name():
    weights = schedules.starbucks([2, 4, 6], [32, 64, 128], [(2, 32), (4, 64), (6, 128), (6, 32)])
    expected = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(weights, expected)
    with pytest.raises(ValueError, match=r"pairs must be \(layer, dim\) with layer in \[2, 4, 6\]"):
        schedules.starbucks([2, 4, 6], [32, 64], [(3, 32)])
    with pytest.raises(ValueError, match="at least one"):
        schedules.starbucks([2], [32], [])


def test_sampled_counts_and_reproducibility():
    weights = schedules.sampled(6, 5, 2, 3, generator=torch.Generator().manual_seed(0))
    rows = weights.sum(1)
    assert int((rows > 0).sum()) == 2 and set(rows[rows > 0].tolist()) == {3.0}
    again = schedules.sampled(6, 5, 2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weights, again)
    everything = schedules.sampled(6, 5, -1, -1)
    assert torch.equal(everything, torch.ones(6, 5))


def test_sampled_always_include_last_layer():
    for seed in range(5):
        weights = schedules.sampled(4, 3, 1, 1, torch.Generator().manual_seed(seed), always_include_last_layer=True)
        assert weights[-1].sum() == 1 and weights[:-1].sum() == 1
    with pytest.raises(ValueError, match=r"n_layers_per_step must be -1 \(all\) or an int in \[0, 3\]"):
        schedules.sampled(4, 3, 4, 1, always_include_last_layer=True)
