"""Masked-modeling targets: HOG against a hand computation, the losses, teacher token
resampling, the EMA teacher's update and schedule, and the pixel objective left as MAE's."""

from __future__ import annotations

import math

import pytest
import torch

from mim.models.mae import MaskedAutoencoderViT
from mim.models.registry import create_model, model_args
from mim.models.targets import hog, hog_cell, instance_normed_average, masked_loss, resample_tokens
from mim.models.teachers import EmaTeacher, ema_decay


def hog_by_hand(image: list[list[float]], patch: int, cell: int, bins: int) -> list[list[float]]:
    """One grey image as nested lists: Sobel with reflect padding, unsigned angle, hard bins,
    sums per cell, L2 per cell; a patch's cells in row-major order."""
    size = len(image)

    def at(r: int, c: int) -> float:  # reflect padding: -1 -> 1, size -> size - 2
        r = -r if r < 0 else (2 * (size - 1) - r if r >= size else r)
        c = -c if c < 0 else (2 * (size - 1) - c if c >= size else c)
        return image[r][c]

    cells = {}
    for r in range(size):
        for c in range(size):
            gx = sum(w * (at(r + dr, c - 1) - at(r + dr, c + 1)) for dr, w in ((-1, 1), (0, 2), (1, 1)))
            gy = sum(w * (at(r - 1, c + dc) - at(r + 1, c + dc)) for dc, w in ((-1, 1), (0, 2), (1, 1)))
            angle = math.atan2(gy, gx) % math.pi
            index = min(int(angle / math.pi * bins), bins - 1)
            histogram = cells.setdefault((r // cell, c // cell), [0.0] * bins)
            histogram[index] += math.hypot(gx, gy)
    for key, histogram in cells.items():
        norm = math.sqrt(sum(v * v for v in histogram)) or 1.0
        cells[key] = [v / max(norm, 1e-12) for v in histogram]
    per_side, patches = patch // cell, []
    for pr in range(size // patch):
        for pc in range(size // patch):
            values = []
            for cr in range(per_side):
                for cc in range(per_side):
                    values += cells[(pr * per_side + cr, pc * per_side + cc)]
            patches.append(values)
    return patches


def test_hog_equals_a_hand_computation_on_a_small_image():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 8, 8, generator=generator)
    got = hog(image, patch_size=4, cell=2, bins=9)
    expected = torch.tensor(hog_by_hand(image[0, 0].tolist(), 4, 2, 9))
    assert got.shape == (1, 4, 2 * 2 * 9)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)


def test_hog_of_a_vertical_edge_is_in_the_horizontal_gradient_bin():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 1.0  # a vertical edge: the gradient points along x, angle 0
    per_cell = hog(image, patch_size=8, cell=4, bins=9).reshape(4, 9)
    assert per_cell[:, 0].gt(0.99).all() and per_cell[:, 1:].abs().max() < 1e-6


def test_hog_cells_and_channels_line_up_with_the_patch_grid():
    images = torch.rand(2, 3, 32, 32)
    assert hog(images, 16, 8, 9).shape == (2, 4, 4 * 3 * 9)
    assert hog_cell(16, None) == 8 and hog_cell(7, None) == 7 and hog_cell(14, 7) == 7
    # a patch's values come from its pixels (and their neighbours): change the top-left patch of
    # a 3x3 grid and the far ones stay as they were
    images = torch.rand(1, 1, 48, 48)
    changed = images.clone()
    changed[..., :16, :16] = torch.rand(1, 1, 16, 16)
    moved = (hog(changed, 16, 8, 9) - hog(images, 16, 8, 9)).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [True, True, False, True, True, False, False, False, False]


def test_losses_on_hand_values():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    only_first = torch.tensor([[1.0, 0.0]])
    assert masked_loss(pred, target, only_first, "mse").item() == pytest.approx(0.5)
    assert masked_loss(pred, target, torch.ones(1, 2), "mse").item() == pytest.approx(0.5)
    assert masked_loss(pred, target, only_first, "smooth_l1").item() == pytest.approx(0.25)
    second = torch.tensor([[0.0, 1.0]])
    assert masked_loss(pred, target, second, "cosine").item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_tokens_are_resampled_to_the_students_grid():
    tokens = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 3).contiguous()  # a 4x4 grid
    assert torch.equal(resample_tokens(tokens, 4), tokens)
    coarse = resample_tokens(tokens, 2)
    assert coarse.shape == (1, 4, 3)
    assert coarse[0, :, 0].tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])  # each 2x2 block's mean


def test_instance_norm_targets_have_zero_mean_and_unit_variance_per_channel():
    blocks = [torch.randn(2, 16, 8) * 5 + 3, torch.randn(2, 16, 8)]
    target = instance_normed_average(blocks)
    single = instance_normed_average(blocks[:1])
    assert single.mean(dim=1).abs().max() < 1e-5
    assert single.var(dim=1, unbiased=False).sub(1).abs().max() < 1e-3
    assert target.shape == (2, 16, 8)


def test_the_ema_teacher_moves_towards_the_student_by_one_minus_decay():
    student = create_model("mae_vit_debug")
    teacher = EmaTeacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(0.9)
    after = teacher.state_dict()
    student_state = student.state_dict()
    for name, old in before.items():
        expected = 0.9 * old + 0.1 * student_state[name]
        torch.testing.assert_close(after[name], expected)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert ema_decay(0, 100, 0.9998, 0.99999) == 0.9998
    assert ema_decay(100, 100, 0.9998, 0.99999) == 0.99999
    assert ema_decay(50, 100, 0.9, 1.0) == pytest.approx(0.95)


def test_the_pixel_objective_is_maes_with_no_new_parameters():
    torch.manual_seed(0)
    plain = MaskedAutoencoderViT(**model_args("mae_vit_debug", norm_pix_loss=True))
    torch.manual_seed(0)
    same = MaskedAutoencoderViT(
        **model_args("mae_vit_debug", norm_pix_loss=True), pred_dim=None, global_dim=None
    )
    assert plain.state_dict().keys() == same.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], same.state_dict()[k]) for k in plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, plain.num_patches)
    loss, pred, mask = plain(images, 0.75, noise)
    per_patch = ((pred - plain.targets(images)) ** 2).mean(dim=-1)
    assert torch.equal(loss, (per_patch * mask).sum() / mask.sum())
