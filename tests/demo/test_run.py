"""The demo's untrained model: `--seed` fixes the fresh projector, whatever state torch's RNG is in."""

import torch

from minillava.demo.run import DemoConfig, build_base


def _fresh_projector(seed: int) -> dict[str, torch.Tensor]:
    model, _ = build_base(DemoConfig(seed=seed))
    return model.projector.state_dict()


def test_the_seed_fixes_the_fresh_projector():
    torch.manual_seed(123)  # torch seeds every process at random: two runs of the demo start in different states
    first = _fresh_projector(0)
    torch.manual_seed(456)
    again, other = _fresh_projector(0), _fresh_projector(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
