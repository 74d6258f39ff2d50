import pytest
import torch

from minillava.splice import splice_image_features

IMG = 9


def test_scatter_fills_slots_in_reading_order_across_rows():
    ids = torch.tensor([[1, IMG, IMG, 2, IMG, IMG], [3, 4, 5, 6, 7, 8], [IMG, IMG, 1, 1, 1, 1]])
    text = torch.zeros(3, 6, 2)
    feats = torch.arange(3 * 2 * 2, dtype=torch.float).view(3, 2, 2)  # 3 images, 2 tokens each
    out = splice_image_features(ids, text, feats, IMG)
    assert torch.equal(out[0, 1:3], feats[0]) and torch.equal(out[0, 4:6], feats[1])
    assert torch.equal(out[2, 0:2], feats[2])
    assert torch.equal(out[1], text[1])  # the text-only row is untouched
    assert out[0, 0].abs().sum() == 0 and out[0, 3].abs().sum() == 0


def test_mismatch_names_both_counts():
    ids = torch.tensor([[IMG, IMG, IMG]])
    with pytest.raises(ValueError, match="3 placeholder tokens.*4 image feature vectors"):
        splice_image_features(ids, torch.zeros(1, 3, 2), torch.zeros(2, 2, 2), IMG)
    with pytest.raises(ValueError, match="3 placeholder tokens.*0 image feature"):
        splice_image_features(ids, torch.zeros(1, 3, 2), None, IMG)


def test_gradient_flows_into_features():
    ids = torch.tensor([[1, IMG, IMG]])
    feats = torch.randn(1, 2, 4, requires_grad=True)
    splice_image_features(ids, torch.zeros(1, 3, 4), feats, IMG).sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))


def test_rows_are_checked_on_their_own_not_just_the_total():
    """Row 0 has 4 slots but 1 image, row 1 has no slots but 1 image: 4 = 4 in total, yet row 1's image would
    land in row 0. With each row's own feature count the splice refuses, naming the row and both counts."""
    ids = torch.tensor([[IMG, IMG, IMG, IMG], [1, 2, 3, 4]])
    feats = torch.randn(2, 2, 3)  # 2 images of 2 vectors: image 0 is row 0's, image 1 row 1's
    with pytest.raises(ValueError, match=r"^row 0: 4 image placeholder tokens in the text, 2 image feature vectors$"):
        splice_image_features(ids, torch.zeros(2, 4, 3), feats, IMG, features_per_row=[2, 2])
    ok = torch.tensor([[IMG, IMG, 1, 1], [IMG, IMG, 1, 1]])
    out = splice_image_features(ok, torch.zeros(2, 4, 3), feats, IMG, features_per_row=[2, 2])
    assert torch.equal(out[1, :2], feats[1])
