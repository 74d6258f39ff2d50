import pytest
import torch

from minillava.config import VisionConfig
from minillava.vision import load_vision_tower


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("select_layer", [1, -2, -1, 0])
def test_the_tower_runs_only_up_to_the_selected_layer(asset_dir, kind, select_layer):
    tower = load_vision_tower(VisionConfig(source=str(asset_dir("vision", kind)), select_layer=select_layer),
                              asset_dir("vision", kind), torch.float32)  # fmt: skip
    ran = []
    blocks = [m for m in tower.model.modules() if type(m).__name__.endswith("Layer")]
    assert len(blocks) == 3  # the tiny towers have three layers
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    pixels = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        every = tower.hidden_states(pixels)
        assert ran == [0, 1, 2]
        ran.clear()
        features = tower(pixels)

    k = select_layer % 4  # hidden_states: the embeddings, then one entry per layer
    assert ran == list(range(max(k, 1)))  # the layers above the selected one never ran (the embeddings: one)
    assert torch.equal(features, every[k][:, tower.prefix_tokens :])
    ran.clear()
    with torch.no_grad():
        tower.hidden_states(pixels)
    assert ran == [0, 1, 2]  # the full layer list is back


def test_a_select_layer_out_of_range_is_a_clear_error(asset_dir):
    tower = load_vision_tower(VisionConfig(source="x", select_layer=-5), asset_dir("vision", "dinov2"), torch.float32)
    with pytest.raises(ValueError, match="select_layer -5 is out of range for a vision tower with 3 layers"):
        tower(torch.randn(1, 3, 32, 32))
