"""Tests for paper_scale.py's params section: UniAlign's trainable parameters at ViT-B/16 (E = 4, r = 8),
counted from shapes on the meta device, by part and for both router scopes, beside the paper's 7.8M."""

import paper_scale

WIDTH, BLOCKS, E, R = 768, 12, 4, 8
LINEARS = {"in_proj": (WIDTH, 3 * WIDTH), "out_proj": (WIDTH, WIDTH), "c_fc": (WIDTH, 4 * WIDTH),
           "c_proj": (4 * WIDTH, WIDTH)}  # (in, out)
MODALITIES = 7


def test_vit_b16_counts_by_hand():
    linear, shapes = paper_scale.paper_scale_parameters("linear")
    block, _ = paper_scale.paper_scale_parameters("block")
    assert shapes["audio"] == (1, 128, 498) and shapes["video"] == (8, 3, 224, 224) and shapes["point"] == (8192, 3)
    experts = BLOCKS * sum(E * R * (i + o) for i, o in LINEARS.values())  # A (E*r, in) and B (out, E*r)
    assert linear["experts"] == block["experts"] == experts == 4_718_592
    per_modality = BLOCKS * sum((i + 1) * E for i, _ in LINEARS.values())  # a router (in + 1) x E in every linear
    assert per_modality == 258_240  # the number docs/method.md quotes
    assert linear["routers"] == MODALITIES * per_modality
    assert block["routers"] == MODALITIES * BLOCKS * (WIDTH + 1) * E  # one per modality and block, reading ln_1(x)
    grid = (224 // 16) ** 2
    assert linear["tokenizer tactile"] == 3 * WIDTH * 16 * 16 + grid * WIDTH
    assert linear["tokenizer video"] == 2 * 3 * WIDTH * 16 * 16 + 4 * grid * WIDTH  # 8 frames: 4 tubelets in time
    assert linear["tokenizer audio"] == WIDTH * 16 * 16 + 12 * 49 * WIDTH  # 498 frames: 49 time patches
    for counts in (linear, block):
        assert counts["tokenizers"] == sum(v for k, v in counts.items() if k.startswith("tokenizer "))
        assert counts["total"] == counts["tokenizers"] + counts["experts"] + counts["routers"]


def test_the_params_section_prints_both_scopes_beside_the_paper(capsys):
    result = paper_scale.trainable_parameters()
    paper_scale.print_parameters(result)
    out = capsys.readouterr().out
    total = next(r for r in result["counts"] if r["part"] == "total")
    assert f"{total['linear']:,}" in out and f"{total['block']:,}" in out and "7.8M" in out
    assert "--router-scope block" in out and "audio 1x128x498" in out
