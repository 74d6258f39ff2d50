"""The seed tutorial's encoder: torchvision vit_b_16, patch tokens without CLS."""

import torch
from PIL import Image

from minillava.config import ModelConfig, VisionConfig
from minillava.model import MiniLlava


def test_torchvision_backend_end_to_end(asset_dir, tmp_path):
    cfg = ModelConfig(
        vision=VisionConfig(source="torchvision:vit_b_16", backend="torchvision"),
        llm_source=str(asset_dir("llm", "llama")),
    )
    model, p = MiniLlava.build(cfg)
    assert model.vision.patch_grid == (14, 14) and model.tokens_per_image == 196
    assert p.image_transform.mean == (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics

    pixels = torch.randn(2, 3, 224, 224)
    vit = model.vision.model
    with torch.no_grad():  # the tutorial's computation, layer by layer, taken at the penultimate layer
        x = vit._process_input(pixels)
        x = torch.cat([vit.class_token.expand(2, -1, -1), x], 1) + vit.encoder.pos_embedding
        for layer in vit.encoder.layers[:-1]:
            x = layer(x)
        assert torch.allclose(model.vision(pixels), x[:, 1:], atol=1e-5)

    conv = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "yes"}]
    batch = p.collate([p.encode(conv, [Image.new("RGB", (50, 40), (9, 99, 199))])])
    logits = model(**batch).logits
    model.save_pretrained(tmp_path / "m", p)
    loaded, lp = MiniLlava.from_pretrained(tmp_path / "m")
    assert torch.allclose(loaded(**batch).logits, logits, atol=1e-6)  # the random ViT weights were saved
