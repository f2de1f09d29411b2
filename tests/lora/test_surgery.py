"""LoRA surgery on synthetic kohya state dicts: deltas, SVD factoring, resize, merge, extract."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_lora.lora import surgery
from lightning_lora.lora.surgery import UnsupportedLoraError

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _module(
    stem: str, out: int, inp: int, rank: int, alpha: float | None, kernel: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kernel:
        down = torch.randn(rank, inp, kernel, kernel, generator=gen)
        up = torch.randn(out, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, inp, generator=gen)
        up = torch.randn(out, rank, generator=gen)
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def _lora(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    return {
        **_module(LIN, 16, 12, rank, 2.0 * rank, seed=seed),
        **_module(CONV, 8, 6, rank, 1.0, kernel=3, seed=seed + 1),
        **_module(TE, 10, 10, rank, None, seed=seed + 2),
    }


def _deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {s: surgery.module_delta(s, p) for s, p in surgery.group_modules(sd).items()}


def test_module_delta_is_up_down_times_alpha_over_rank() -> None:
    sd = _lora()
    deltas = _deltas(sd)
    down, up = sd[f"{LIN}.lora_down.weight"], sd[f"{LIN}.lora_up.weight"]
    torch.testing.assert_close(deltas[LIN], up.double() @ down.double() * 2.0)  # alpha 8 / rank 4
    cdown, cup = sd[f"{CONV}.lora_down.weight"], sd[f"{CONV}.lora_up.weight"]
    expected = (cup.flatten(1).double() @ cdown.flatten(1).double()).reshape(8, 6, 3, 3) / 4
    assert deltas[CONV].shape == (8, 6, 3, 3)
    torch.testing.assert_close(deltas[CONV], expected)
    tdown, tup = sd[f"{TE}.lora_down.weight"], sd[f"{TE}.lora_up.weight"]
    torch.testing.assert_close(deltas[TE], tup.double() @ tdown.double())  # no alpha: scale 1


def test_low_rank_picks_rank_by_share_of_squared_singular_values() -> None:
    gen = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    delta = q1 @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)) @ q2.T
    # energies 16, 4, 1 of 21
    assert surgery.low_rank(delta, keep_share=0.7).rank == 1
    assert surgery.low_rank(delta, keep_share=0.8).rank == 2
    assert surgery.low_rank(delta, keep_share=1.0).rank == 3
    one = surgery.low_rank(delta, rank=1)
    assert one.share == pytest.approx(16 / 21)
    full = surgery.low_rank(delta, rank=10)  # capped at the matrix size
    assert full.rank == 5 and full.share == pytest.approx(1.0)
    torch.testing.assert_close((full.up @ full.down).double(), delta, atol=1e-5, rtol=1e-5)
    # sqrt(S) on each side: equal norms per rank-1 component
    two = surgery.low_rank(delta, rank=2)
    torch.testing.assert_close(two.up.norm(dim=0), two.down.norm(dim=1))


def test_resize_at_full_rank_is_exact_and_alpha_is_the_rank() -> None:
    sd = _lora()
    out, reports = surgery.resize(sd, rank=4)
    assert {r.stem: (r.old_rank, r.rank) for r in reports} == {s: (4, 4) for s in (CONV, LIN, TE)}
    assert all(r.share == pytest.approx(1.0) for r in reports)
    for stem, delta in _deltas(out).items():
        torch.testing.assert_close(delta, _deltas(sd)[stem], atol=1e-4, rtol=1e-4)
        assert float(out[f"{stem}.alpha"]) == 4.0
    assert out[f"{CONV}.lora_down.weight"].shape == (4, 6, 3, 3)
    assert out[f"{CONV}.lora_up.weight"].shape == (8, 4, 1, 1)


def test_resize_lower_rank_is_the_best_approximation_and_reports_the_share() -> None:
    sd = _lora()
    out, reports = surgery.resize(sd, rank=2)
    for r in reports:
        assert r.rank == 2 and 0.0 < r.share < 1.0
        delta = _deltas(sd)[r.stem].flatten(1)
        s = torch.linalg.svdvals(delta)
        assert r.share == pytest.approx(float(s[:2].square().sum() / s.square().sum()))
        # Eckart-Young: the error's energy is the dropped singular values'
        err = (_deltas(out)[r.stem].flatten(1) - delta).square().sum()
        assert float(err) == pytest.approx(float(s[2:].square().sum()), rel=1e-4)
        assert out[f"{r.stem}.lora_down.weight"].shape[0] == 2


def test_resize_above_the_current_rank_keeps_it_and_says_so() -> None:
    out, reports = surgery.resize(_lora(rank=3), rank=8)
    assert all(r.rank == 3 and "kept the current rank 3" in r.note for r in reports)
    assert out[f"{LIN}.lora_down.weight"].shape[0] == 3


def test_resize_by_share() -> None:
    sd = _lora()
    _, full = surgery.resize(sd, keep_share=1.0)
    assert [r.rank for r in full] == [4, 4, 4]
    _, part = surgery.resize(sd, keep_share=0.5)
    assert all(r.share >= 0.5 and r.rank < 4 for r in part)


def test_modules_of_different_ranks_share_one_alpha_and_keep_their_deltas() -> None:
    sd = {**_module(LIN, 16, 12, 4, 8.0), **_module(CONV, 8, 6, 2, 2.0, kernel=3, seed=1)}
    out, reports = surgery.resize(sd, rank=4)
    assert {r.stem: r.rank for r in reports} == {LIN: 4, CONV: 2}
    # diffusers' kohya loader mis-scales modules whose alpha is not the file's most common one
    assert float(out[f"{LIN}.alpha"]) == float(out[f"{CONV}.alpha"]) == 4.0
    for stem, delta in _deltas(out).items():
        torch.testing.assert_close(delta, _deltas(sd)[stem], atol=1e-4, rtol=1e-4)
    meta = surgery.updated_metadata({}, reports, {"tool": "resize"})
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "4"


def test_exact_merge_concatenates_ranks_and_equals_the_weighted_sum() -> None:
    a = _lora(seed=0, rank=4)
    b = {k: v for k, v in _lora(seed=10, rank=2).items() if not k.startswith(TE)}
    merged, reports = surgery.merge([(a, 0.7), (b, 0.5)])
    da, db, dm = _deltas(a), _deltas(b), _deltas(merged)
    for stem in (LIN, CONV):
        torch.testing.assert_close(dm[stem], 0.7 * da[stem] + 0.5 * db[stem], atol=1e-4, rtol=1e-4)
        assert float(merged[f"{stem}.alpha"]) == 6.0
    torch.testing.assert_close(dm[TE], 0.7 * da[TE], atol=1e-4, rtol=1e-4)
    by_stem = {r.stem: r for r in reports}
    assert by_stem[LIN].rank == 6 and by_stem[TE].rank == 4
    assert by_stem[TE].note == "in 1 of 2 inputs"


def test_svd_merge_at_full_rank_is_exact_and_lower_rank_keeps_a_share() -> None:
    a, b = _lora(seed=0), _lora(seed=5)
    target = {s: 0.7 * d + 0.5 * _deltas(b)[s] for s, d in _deltas(a).items()}
    merged, reports = surgery.merge([(a, 0.7), (b, 0.5)], rank=8)
    for stem, delta in _deltas(merged).items():
        torch.testing.assert_close(delta, target[stem], atol=1e-4, rtol=1e-4)
    assert all(r.share == pytest.approx(1.0) for r in reports)
    _, low = surgery.merge([(a, 0.7), (b, 0.5)], rank=2)
    assert all(r.rank == 2 and r.share < 1.0 for r in low)


def test_merge_rejects_a_module_of_different_shapes() -> None:
    a = _module(LIN, 16, 12, 2, 2.0)
    b = _module(LIN, 16, 10, 2, 2.0)
    with pytest.raises(UnsupportedLoraError, match=LIN):
        surgery.merge([(a, 1.0), (b, 1.0)])


def test_extract_recovers_a_planted_low_rank_difference() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {
        "a.to_q": torch.randn(16, 12, generator=gen),
        "a.conv1": torch.randn(8, 6, 3, 3, generator=gen),
        "a.same": torch.randn(5, 5, generator=gen),
    }
    planted = {
        "a.to_q": torch.randn(16, 2, generator=gen) @ torch.randn(2, 12, generator=gen),
        "a.conv1": (torch.randn(8, 2, generator=gen) @ torch.randn(2, 54, generator=gen)).reshape(
            8, 6, 3, 3
        ),
    }
    tuned = {k: v + planted.get(k, 0) for k, v in base.items()}
    out, reports = surgery.extract(base, tuned, rank=4, conv_rank=2)
    assert [r.stem for r in reports] == ["lora_unet_a_conv1", "lora_unet_a_to_q"]
    assert {r.stem: r.rank for r in reports} == {"lora_unet_a_conv1": 2, "lora_unet_a_to_q": 4}
    deltas = _deltas(out)
    for name, delta in planted.items():
        torch.testing.assert_close(
            deltas[surgery.stem_of(name)].float(), delta, atol=1e-4, rtol=1e-4
        )
    assert all(r.share == pytest.approx(1.0) for r in reports)
    assert float(out["lora_unet_a_to_q.alpha"]) == 4.0
    # a tolerance above the planted difference leaves every module out
    assert surgery.extract(base, tuned, rank=2, min_diff=1e3)[1] == []


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_x_to_q.hada_w1_a",
        "lora_unet_x_to_q.lokr_w1",
        "lora_unet_x_conv1.lora_mid.weight",
        "unet.x.to_q.lora_A.weight",
    ],
)
def test_unsupported_keys_are_named(key: str) -> None:
    sd = {**_module(LIN, 4, 4, 2, 2.0), key: torch.zeros(2, 2)}
    with pytest.raises(UnsupportedLoraError, match=key.replace(".", r"\.")):
        surgery.group_modules(sd)
    if "hada" in key:
        with pytest.raises(UnsupportedLoraError, match="LoRA/LoCon"):
            surgery.resize(sd, rank=1)


def test_a_module_without_its_up_matrix_is_an_error() -> None:
    sd = _module(LIN, 4, 4, 2, 2.0)
    del sd[f"{LIN}.lora_up.weight"]
    with pytest.raises(UnsupportedLoraError, match="lora_up"):
        surgery.group_modules(sd)


def test_metadata_records_the_new_dim_and_the_tool() -> None:
    meta = {
        "ss_network_dim": "4",
        "ss_network_alpha": "8",
        "ss_training_comment": "trained",
        "lora_adapter_metadata": "{}",
        "ss_num_epochs": "3",
    }
    reports = [surgery.ModuleReport("a", 2, 0.9, 4), surgery.ModuleReport("b", 2, 0.8, 4)]
    new = surgery.updated_metadata(meta, reports, {"tool": "resize", "rank": 2})
    assert new["ss_network_dim"] == "2" and new["ss_network_alpha"] == "2"
    assert new["ss_num_epochs"] == "3"
    assert "lora_adapter_metadata" not in new
    assert new["ss_training_comment"].startswith("trained; lightning-lora-tools tool=resize")
    assert json.loads(new["lightning_lora_tool"])["rank"] == 2
    mixed = [*reports, surgery.ModuleReport("c", 3, 1.0, 4)]
    assert surgery.updated_metadata(meta, mixed, {})["ss_network_dim"] == "Dynamic"
    assert surgery.updated_metadata(meta, mixed, {})["ss_network_alpha"] == "3"


def test_add_to_weights_adds_the_scaled_delta_and_names_a_missing_module() -> None:
    lin = torch.nn.Linear(12, 16)
    conv = torch.nn.Conv2d(6, 8, 3)
    before = (lin.weight.detach().clone(), conv.weight.detach().clone())
    sd = {k: v for k, v in _lora().items() if not k.startswith(TE)}
    stems = surgery.add_to_weights({LIN: lin, CONV: conv}, sd, scale=0.5)
    assert stems == [LIN, CONV]  # sorted: attentions before resnets
    deltas = _deltas(sd)
    torch.testing.assert_close(lin.weight.detach(), before[0] + 0.5 * deltas[LIN].float())
    torch.testing.assert_close(conv.weight.detach(), before[1] + 0.5 * deltas[CONV].float())
    with pytest.raises(UnsupportedLoraError, match=TE):
        surgery.add_to_weights({LIN: lin, CONV: conv}, _lora())
    with pytest.raises(UnsupportedLoraError, match="delta is"):
        surgery.add_to_weights({LIN: torch.nn.Linear(12, 15), CONV: conv}, sd)


def test_report_table_lists_every_module() -> None:
    _, reports = surgery.resize(_lora(), rank=2)
    table = surgery.format_report(reports)
    assert all(stem in table for stem in (LIN, CONV, TE))
    assert "4->2" in table and "%" in table and "3 modules" in table
