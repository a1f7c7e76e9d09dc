"""Attention maps against a hand computation, and the pictures they go into: titled grids that
scale small images with nearest neighbour, the heat overlay, the line chart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mim.models import create_model
from mim.models.attention import check_block, cls_attention
from mim.models.backbone import create_vit, load_encoder
from mim.pictures import heat_colours, line_chart, nice_ticks, tick_labels, titled_grid
from mim.visualize import RECONSTRUCTION_TITLES, attention_grid, overlay, reconstruction_grid
from mim.weights import load_weights


@pytest.fixture
def model():
    torch.manual_seed(0)
    # 32x32 RGB in 8x8 patches (16 patches), 3 blocks of 4 heads
    return create_model("mae_vit_debug", depth=3, num_heads=4).eval()


def hand_attention(model, images, block):
    """softmax(q k^T / sqrt(d)) of the cls row, from the block's qkv weights and norm1."""
    x = model.patch_embed(images) + model.pos_embed[:, 1:]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(images), -1, -1), x], dim=1)
    for earlier in model.blocks[:block]:
        x = earlier(x)
    target = model.blocks[block]
    y = F.layer_norm(x, (x.shape[-1],), target.norm1.weight, target.norm1.bias, target.norm1.eps)
    weight, bias = target.attn.qkv.weight, target.attn.qkv.bias
    width, heads = x.shape[-1], target.attn.num_heads
    d = width // heads
    q = (y @ weight[:width].T + bias[:width]).view(len(images), -1, heads, d).transpose(1, 2)
    k = (
        (y @ weight[width : 2 * width].T + bias[width : 2 * width])
        .view(len(images), -1, heads, d)
        .transpose(1, 2)
    )
    return torch.softmax(q[:, :, 0:1] @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)[:, :, 0]


@pytest.mark.parametrize("block", [0, 2, -1])
def test_cls_attention_equals_the_hand_computation_and_sums_to_one(model, block):
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = cls_attention(model, images, block)
        expected = hand_attention(model, images, block % len(model.blocks))
    assert got.shape == (3, model.blocks[0].attn.num_heads, 1 + model.num_patches)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-6)
    assert not torch.allclose(got[:, 0], got[:, 1])  # heads differ


def test_timm_vit_of_the_same_weights_gives_the_same_maps(model, tmp_path):
    """The path `mim visualize --attention` takes for exports and classifier checkpoints."""
    torch.save({"model": model.state_dict()}, tmp_path / "mae.pth")
    weights = load_weights(str(tmp_path / "mae.pth"))
    weights.arch["num_heads"] = 4  # a bare state dict does not say; the run's meta.json would
    vit = create_vit(weights.arch, num_classes=0, global_pool="token", fc_norm=False)
    load_encoder(vit, weights, set(), set())
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(cls_attention(vit.eval(), images), cls_attention(model, images), atol=1e-5)


def test_a_block_out_of_range_names_the_depth(model):
    assert check_block(model, -1) == 2 and check_block(model, 1) == 1
    with pytest.raises(ValueError, match="3 blocks"):
        check_block(model, 3)
    with pytest.raises(ValueError, match="3 blocks"):
        check_block(model, -4)


def test_titled_grid_scales_small_images_with_nearest_neighbour():
    column = torch.rand(2, 1, 28, 28)
    grid = titled_grid([column, 1 - column], ["left", "right"])
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    scale = 4  # 28 px -> 112 px, the smallest cell
    header = grid.shape[1] - 2 * 28 * scale - 3 * 2
    assert 10 < header < 60 and grid.shape[2] == 2 * 28 * scale + 3 * 2
    # The first image's top-left pixel fills a 4x4 block of identical values.
    top, left = header + 2, 2
    block = grid[0, top : top + scale, left : left + scale]
    assert torch.all(block == round(float(column[0, 0, 0, 0]) * 255))
    # The title strip holds dark text pixels over each column.
    assert (grid[:, :header, : 2 + 112] < 128).any() and (grid[:, :header, 116:] < 128).any()


def test_overlay_scales_each_map_to_its_maximum():
    pictures = torch.zeros(2, 1, 8, 8)
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.25], [0.0, 0.0]]])  # same shape, other scale
    out = overlay(pictures, maps, opacity=1.0)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[0], out[1])
    assert torch.allclose(out[0, :, 0, 4], heat_colours(torch.tensor(1.0)))  # the patch at the top right
    assert torch.allclose(out[0, :, 7, 0], heat_colours(torch.tensor(0.0)))


def test_grids_have_one_column_per_title(model):
    images = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    reconstruction = reconstruction_grid(model, images, mean, std, 0.75)
    attention = attention_grid(model, images, mean, std)
    cell = 4 * 32 + 2
    assert reconstruction.shape[2] == len(RECONSTRUCTION_TITLES) * cell + 2
    heads = model.blocks[-1].attn.num_heads
    assert attention.shape[2] == (1 + heads + 1) * cell + 2  # image, each head, mean


def test_line_chart_writes_a_png(tmp_path):
    line_chart({"kNN top-1": [(0, 60.0), (100, 65.5), (200, 70.0)]}, tmp_path / "c.png", "t", "x", "y")
    picture = Image.open(tmp_path / "c.png")
    assert picture.size == (640, 400)
    with pytest.raises(ValueError, match="at least one point"):
        line_chart({"empty": []}, tmp_path / "d.png", "t", "x", "y")


def test_a_heading_and_a_colour_scale_stand_over_and_under_the_grid():
    column = torch.rand(2, 1, 28, 28)
    plain = titled_grid([column], ["image"])
    titled = titled_grid([column], ["image"], heading="what this is, step 7", colour_scale=("0", "max"))
    assert titled.shape[2] == plain.shape[2] and titled.shape[1] > plain.shape[1] + 20
    assert (titled[:, :12] < 128).any()  # dark heading text in the top rows
    bar_row = titled[:, -30].float() / 255  # a row through the colour bar at the bottom
    assert torch.allclose(bar_row[:, 4], heat_colours(torch.tensor(0.0)), atol=0.02)
    assert torch.allclose(bar_row[:, -5], heat_colours(torch.tensor(1.0)), atol=0.02)


@pytest.mark.parametrize(
    ("low", "high", "ticks", "labels"),
    [
        (62.2, 78.1, [60, 65, 70, 75, 80], ["60", "65", "70", "75", "80"]),
        (0, 187_200, [0, 50_000, 100_000, 150_000, 200_000], ["0", "50k", "100k", "150k", "200k"]),
        (85.1, 85.9, [85.0, 85.2, 85.4, 85.6, 85.8, 86.0], ["85.0", "85.2", "85.4", "85.6", "85.8", "86.0"]),
        (0, 1170, [0, 250, 500, 750, 1000, 1250], ["0", "250", "500", "750", "1,000", "1,250"]),
    ],
)
def test_chart_ticks_are_round_numbers_that_cover_the_data(low, high, ticks, labels):
    got = nice_ticks(low, high)
    assert got == pytest.approx(ticks) and got[0] <= low and got[-1] >= high
    assert tick_labels(got) == labels


def test_reconstructions_have_a_heading_and_attention_maps_a_colour_scale(model):
    images = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    plain_height = titled_grid([torch.rand(2, 3, 32, 32)] * 4, RECONSTRUCTION_TITLES).shape[1]
    reconstruction = reconstruction_grid(model, images, mean, std, 0.75, what="step 3")
    assert reconstruction.shape[1] > plain_height and (reconstruction[:, :12] < 128).any()
    attention = attention_grid(model, images, mean, std, what="step 3").float() / 255
    low, high = heat_colours(torch.tensor(0.0)), heat_colours(torch.tensor(1.0))
    bar_rows = [
        row
        for row in range(attention.shape[1] - 60, attention.shape[1])
        if torch.allclose(attention[:, row, 4], low, atol=0.02)
        and torch.allclose(attention[:, row, -5], high, atol=0.02)
    ]
    assert len(bar_rows) >= 10  # the bar from dark (0) to bright (each map's maximum), under the rows
