"""`mmerge.analyze`: every figure against a direct numpy computation, on generated models with
known structure (orthogonal, opposite, parallel, from another base)."""

import json
import math
import multiprocessing
import sys
import threading

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmerge.analyze import analyze, scan, stats
from mmerge.analyze.groups import group_of, group_order
from mmerge.analyze.report import render, worst_first
from mmerge.errors import FormatError, InvalidInput, PlanError
from mmerge.io import open_checkpoint

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.1.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
FLAG_WORDS = ("different base", "not share", "unrelated", "far from", "not a fine-tune", "outlier")


def make_base(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}


def write(path, tensors, dtype=np.float32):
    save_file({n: np.ascontiguousarray(a, dtype=dtype) for n, a in tensors.items()}, str(path))
    return str(path)


def family(tmp_path, deltas, base=None, dtype=np.float32):
    """Write base and base + delta for each delta dict; return (base path, ft paths, arrays)."""
    base = make_base() if base is None else base
    fts = [{n: base[n] + d[n] for n in base} for d in deltas]
    paths = [write(tmp_path / f"ft{i + 1}.safetensors", ft, dtype) for i, ft in enumerate(fts)]
    cast = {n: np.asarray(a, dtype).astype(np.float32) for n, a in base.items()}
    read_fts = [{n: np.asarray(a, dtype).astype(np.float32) for n, a in ft.items()} for ft in fts]
    return write(tmp_path / "base.safetensors", base, dtype), paths, cast, read_fts


def gaussian(seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()}


# --- direct numpy reference -------------------------------------------------------------------


def ref_counts(base, fts, names, densities):
    """Sums over `names` computed directly in float64 (per-tensor top-k, as TIES trims)."""
    n = len(fts)
    out = {
        "bb": 0.0,
        "dot": np.zeros((n, n)),
        "bd": np.zeros(n),
        "kept": np.zeros((len(densities), n)),
    }
    out.update(both=np.zeros((n, n)), conf=np.zeros((n, n)))
    out.update(tboth=np.zeros((len(densities), n, n)), tconf=np.zeros((len(densities), n, n)))
    out["numel"] = 0
    for name in names:
        b = base[name].ravel().astype(np.float64)
        ds = [(ft[name].ravel() - base[name].ravel()).astype(np.float64) for ft in fts]
        out["numel"] += b.size
        out["bb"] += b @ b
        masks = []
        for i, d in enumerate(ds):
            out["bd"][i] += b @ d
            row = []
            for k, dens in enumerate(densities):
                kk = math.ceil(dens * d.size)
                thr = np.sort(np.abs(d))[-kk]
                m = (np.abs(d) >= thr) & (d != 0)
                out["kept"][k, i] += np.sum(d[m] ** 2)
                row.append(m)
            masks.append(row)
            for j in range(n):
                out["dot"][i, j] += d @ ds[j]
        for i in range(n):
            for j in range(i + 1, n):
                both = (ds[i] != 0) & (ds[j] != 0)
                opp = np.sign(ds[i]) * np.sign(ds[j]) < 0
                out["both"][i, j] += both.sum()
                out["conf"][i, j] += opp.sum()
                for k in range(len(densities)):
                    tb = masks[i][k] & masks[j][k]
                    out["tboth"][k, i, j] += tb.sum()
                    out["tconf"][k, i, j] += (tb & opp).sum()
    return out


def close(value, num, den, **tol):
    """value == num / den (approx), or None where the ratio is undefined (den == 0)."""
    if den == 0:
        return value is None
    return value == pytest.approx(num / den, **tol)


def check_figures(fig, r, densities):
    n = len(fig["models"])
    assert fig["numel"] == r["numel"]
    assert fig["base_norm"] == pytest.approx(math.sqrt(r["bb"]), rel=1e-6)
    for i, m in enumerate(fig["models"]):
        dd = r["dot"][i, i]
        ff = r["bb"] + 2 * r["bd"][i] + dd
        assert m["task_norm"] == pytest.approx(math.sqrt(dd), rel=1e-6)
        assert m["relative_change"] == pytest.approx(math.sqrt(dd / r["bb"]), rel=1e-6)
        assert m["base_weight_cos"] == pytest.approx(
            (r["bb"] + r["bd"][i]) / math.sqrt(ff * r["bb"]), abs=1e-6
        )
        for k, dens in enumerate(densities):
            assert close(m["kept_energy"][f"{dens:g}"], r["kept"][k, i], dd, rel=1e-6)
    p = 0
    for i in range(n):
        for j in range(i + 1, n):
            pair = fig["pairs"][p]
            p += 1
            dii, djj, dij = r["dot"][i, i], r["dot"][j, j], r["dot"][i, j]
            assert close(pair["task_cos"], dij, math.sqrt(dii * djj), abs=1e-6)
            fi = r["bb"] + 2 * r["bd"][i] + dii
            fj = r["bb"] + 2 * r["bd"][j] + djj
            fij = r["bb"] + r["bd"][i] + r["bd"][j] + dij
            angle = math.degrees(math.acos(fij / math.sqrt(fi * fj)))
            assert pair["weight_angle_deg"] == pytest.approx(angle, abs=1e-4)
            assert close(pair["norm_ratio"], math.sqrt(djj), math.sqrt(dii), rel=1e-6)
            assert pair["overlap"] == pytest.approx(r["both"][i, j] / r["numel"])
            assert close(pair["sign_conflict"], r["conf"][i, j], r["both"][i, j])
            for k, dens in enumerate(densities):
                top = pair["sign_conflict_top"][f"{dens:g}"]
                assert close(top, r["tconf"][k, i, j], r["tboth"][k, i, j])


def test_figures_match_direct_numpy(tmp_path):
    # three fine-tunes: independent, partly aligned with the first, and sparse
    d1, d2 = gaussian(1), gaussian(2)
    d3 = {n: 0.6 * d1[n] + gaussian(3)[n] for n in SHAPES}
    d4 = {n: np.where(np.abs(v) > 0.015, v, 0).astype(np.float32) for n, v in gaussian(4).items()}
    base_p, ft_p, base, fts = family(tmp_path, [d2, d3, d4])
    densities = (0.1, 0.25, 0.5)
    res = analyze(base_p, ft_p, densities=densities)
    names = list(SHAPES)
    check_figures(res.overall, ref_counts(base, fts, names, densities), densities)
    for layer in res.layers:
        members = [n for n in names if group_of(n) == layer["layer"]]
        check_figures(layer, ref_counts(base, fts, members, densities), densities)
    for t in res.tensors:
        check_figures(t, ref_counts(base, fts, [t["name"]], densities), densities)
    assert [g["layer"] for g in res.layers] == ["embed", 0, 1, "head"]
    assert [m["model"] for m in res.models] == ["ft1", "ft2", "ft3"]


def test_bf16_inputs_are_measured_as_stored(tmp_path):
    base_p, ft_p, base, fts = family(tmp_path, [gaussian(1), gaussian(2)], dtype=ml_dtypes.bfloat16)
    res = analyze(base_p, ft_p, densities=(0.3,))
    check_figures(res.overall, ref_counts(base, fts, list(SHAPES), (0.3,)), (0.3,))


def test_orthogonal_task_vectors(tmp_path):
    d1, d2 = gaussian(1), gaussian(2)
    for n in SHAPES:  # disjoint supports
        d1[n].ravel()[1::2] = 0
        d2[n].ravel()[0::2] = 0
    res = analyze(*family(tmp_path, [d1, d2])[:2]).to_json()
    for fig in [res["overall"], *res["layers"], *res["tensors"]]:
        assert fig["pairs"][0]["task_cos"] == 0.0
        assert fig["pairs"][0]["overlap"] == 0.0
        assert fig["pairs"][0]["sign_conflict"] is None
    assert res["recommendation"]["methods"] == ["task_arithmetic", "ties"]
    assert not any(w in json.dumps(res).lower() for w in FLAG_WORDS)


def test_opposite_task_vectors_conflict_fully(tmp_path):
    d1 = gaussian(1)
    res = analyze(*family(tmp_path, [d1, {n: -v for n, v in d1.items()}])[:2]).to_json()
    pair = res["overall"]["pairs"][0]
    assert pair["task_cos"] == pytest.approx(-1.0, abs=1e-6)
    assert pair["sign_conflict"] == 1.0
    assert all(v == 1.0 for v in pair["sign_conflict_top"].values())
    assert res["recommendation"]["methods"] == ["ties", "dare_ties"]
    assert any(f["kind"] == "conflict" for f in res["findings"])
    assert not any(w in json.dumps(res).lower() for w in FLAG_WORDS)


def test_near_parallel_fine_tunes_recommend_linear(tmp_path):
    d1, noise = gaussian(1), gaussian(9, scale=0.001)
    res = analyze(*family(tmp_path, [d1, {n: 1.1 * d1[n] + noise[n] for n in SHAPES}])[:2])
    assert res.overall["pairs"][0]["task_cos"] > 0.99
    assert res.recommendation["methods"] == ["linear"]


def test_magnitude_imbalance_is_reported(tmp_path):
    res = analyze(*family(tmp_path, [gaussian(1, 0.002), gaussian(2, scale=0.008)])[:2])
    assert res.overall["pairs"][0]["norm_ratio"] == pytest.approx(4.0, rel=0.05)
    assert any(f["kind"] == "balance" and "ft2's task vector" in f["text"] for f in res.findings)
    assert "per-model weights" in res.recommendation["text"]


def test_model_from_another_base_is_flagged(tmp_path):
    base_p, ft_p, _, _ = family(tmp_path, [gaussian(1), gaussian(2)])
    stranger = write(tmp_path / "stranger.safetensors", make_base(seed=7))
    res = analyze(base_p, [*ft_p, stranger]).to_json()
    flagged = [f for f in res["findings"] if "does not share a base" in f["text"]]
    assert [f["subject"] for f in flagged] == ["stranger"]
    assert res["recommendation"]["text"].startswith("leave out stranger")
    assert res["recommendation"]["methods"] == ["ties", "dare_ties"]  # ft1 ~ ft2: independent
    # with one fine-tune only (base + stranger) the absolute check still flags it
    alone = analyze(base_p, [stranger]).to_json()
    assert any("does not share a base" in f["text"] for f in alone["findings"])


def test_far_larger_change_than_the_others_is_flagged(tmp_path):
    big = {n: v * 60 for n, v in gaussian(3).items()}  # still correlated with the base
    base = {n: v + 1.0 for n, v in make_base().items()}  # a base far from zero
    res = analyze(*family(tmp_path, [gaussian(1), gaussian(2), big], base=base)[:2])
    model = res.overall["models"][2]
    assert model["base_weight_cos"] > 0.5
    flagged = [f["subject"] for f in res.findings if "does not share a base" in f["text"]]
    assert flagged == ["ft3"]


def test_related_fine_tunes_are_never_flagged(tmp_path):
    # dense, small and large (but same-base) changes, with one or two fine-tunes
    for k, deltas in enumerate([[gaussian(1)], [gaussian(1), gaussian(2, scale=0.015)]]):
        folder = tmp_path / str(k)
        folder.mkdir()
        res = analyze(*family(folder, deltas)[:2]).to_json()
        assert all(m["base_weight_cos"] > 0.5 for m in res["overall"]["models"])
        assert not any(w in json.dumps(res).lower() for w in FLAG_WORDS)


def test_single_fine_tune(tmp_path):
    res = analyze(*family(tmp_path, [gaussian(1)])[:2])
    assert res.overall["pairs"] == []
    assert res.recommendation["methods"] == ["linear", "slerp"]
    text = render(res)
    assert "Recommendation: linear or slerp" in text and "Pairs" not in text


def test_worst_layer_comes_first(tmp_path):
    d1, d2 = gaussian(1), gaussian(2)
    for n in SHAPES:
        d2[n] = d1[n] * 0.9 + d2[n] * 0.1  # aligned everywhere ...
        if group_of(n) == 1:
            d2[n] = -d1[n]  # ... except layer 1, where they oppose
    res = analyze(*family(tmp_path, [d1, d2])[:2])
    assert worst_first(res)[0]["layer"] == 1
    lines = render(res).splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("Layers"))) + 2]
    assert table.split()[0] == "1"
    assert any("high in layers 1 " in f["text"] for f in res.findings)


def test_non_float_tensors_are_skipped(tmp_path):
    shapes = {**SHAPES}
    base = make_base()
    ids = np.arange(8, dtype=np.int64)
    write(tmp_path / "b.safetensors", base)
    save_file({**base, "position_ids": ids}, str(tmp_path / "base.safetensors"))
    save_file(
        {**{n: base[n] + gaussian(1)[n] for n in shapes}, "position_ids": ids},
        str(tmp_path / "ft.safetensors"),
    )
    res = analyze(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"])
    assert "position_ids" not in [t["name"] for t in res.tensors]


def test_sharded_folder_input(tmp_path):
    base_p, ft_p, base, fts = family(tmp_path, [gaussian(1), gaussian(2)])
    folder = tmp_path / "ft2_folder"
    folder.mkdir()
    names = list(SHAPES)
    write(folder / "a.safetensors", {n: fts[1][n] for n in names[:4]})
    write(folder / "b.safetensors", {n: fts[1][n] for n in names[4:]})
    a = analyze(base_p, ft_p).overall
    b = analyze(base_p, [ft_p[0], folder]).overall
    assert b["pairs"][0]["task_cos"] == pytest.approx(a["pairs"][0]["task_cos"])


def test_progress_is_reported_per_tensor(tmp_path):
    seen = []
    analyze(*family(tmp_path, [gaussian(1)])[:2], progress=lambda i, n, name: seen.append((i, n)))
    assert seen == [(i + 1, len(SHAPES)) for i in range(len(SHAPES))]


def test_worker_processes_give_the_same_figures(tmp_path):
    base_p, ft_p, _, _ = family(tmp_path, [gaussian(1), gaussian(2)], dtype=ml_dtypes.bfloat16)
    alone = analyze(base_p, ft_p, workers=1).to_json()
    seen = []
    shared = analyze(base_p, ft_p, workers=3, progress=lambda i, n, name: seen.append((i, name)))
    assert shared.to_json() == alone
    assert [i for i, _ in seen] == list(range(1, len(SHAPES) + 1))
    assert sorted(name for _, name in seen) == sorted(SHAPES)
    with open_checkpoint(base_p) as ckpt:  # the base's order, not the order they finished in
        assert [t["name"] for t in shared.to_json()["tensors"]] == list(ckpt)


@pytest.mark.slow
def test_spawned_workers_give_the_same_figures(tmp_path, monkeypatch):
    base_p, ft_p, _, _ = family(tmp_path, [gaussian(1), gaussian(2)])
    alone = analyze(base_p, ft_p, workers=1).to_json()
    monkeypatch.setattr(scan, "_pool_context", lambda: multiprocessing.get_context("spawn"))
    assert analyze(base_p, ft_p, workers=2).to_json() == alone


def test_fork_only_while_no_other_thread_runs():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert scan._pool_context().get_start_method() == "spawn"
    finally:
        stop.set()
        other.join()
    if LINUX and threading.active_count() == 1:
        assert scan._pool_context().get_start_method() == "fork"


LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="needs fork: the workers inherit the patch")
def test_an_error_in_a_worker_reaches_the_caller(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise FormatError("tensor bytes unreadable")

    monkeypatch.setattr(scan, "exact_sums", broken)
    with pytest.raises(FormatError, match="tensor bytes unreadable"):
        analyze(*family(tmp_path, [gaussian(1)])[:2], workers=2)


def test_one_worker_per_usable_core_except_for_small_models(monkeypatch):
    monkeypatch.setattr(scan.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert scan.default_workers(scan.SMALL) == 3
    assert scan.default_workers(scan.SMALL - 1) == 1


# --- bad input ----------------------------------------------------------------------------------


def test_missing_tensor_is_a_plan_error(tmp_path):
    base_p, ft_p, base, _ = family(tmp_path, [gaussian(1)])
    short = write(
        tmp_path / "short.safetensors", {n: v for n, v in base.items() if n != "lm_head.weight"}
    )
    with pytest.raises(PlanError, match="short has no tensor 'lm_head.weight'"):
        analyze(base_p, [ft_p[0], short])
    extra = write(tmp_path / "extra.safetensors", {**base, "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(PlanError, match="'extra.weight' that the base does not have"):
        analyze(base_p, [extra])


def test_shape_mismatch_is_a_plan_error(tmp_path):
    base_p, _, base, _ = family(tmp_path, [gaussian(1)])
    odd = write(tmp_path / "odd.safetensors", {**base, "model.norm.weight": np.ones(8, np.float32)})
    with pytest.raises(PlanError, match=r"'model.norm.weight' has shape \[8\] in odd but \[16\]"):
        analyze(base_p, [odd])


@pytest.mark.parametrize("densities", [(0.0,), (1.5,), ("x",), ()])
def test_bad_density_is_invalid_input(tmp_path, densities):
    base_p, ft_p, _, _ = family(tmp_path, [gaussian(1)])
    with pytest.raises(InvalidInput, match="density"):
        analyze(base_p, ft_p, densities=densities)


def test_zero_workers_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="workers"):
        analyze(*family(tmp_path, [gaussian(1)])[:2], workers=0)


def test_no_fine_tunes_is_invalid_input(tmp_path):
    base_p, _, _, _ = family(tmp_path, [gaussian(1)])
    with pytest.raises(InvalidInput, match="at least one fine-tune"):
        analyze(base_p, [])
    with pytest.raises(InvalidInput, match="at least one fine-tune"):
        analyze(base_p, base_p)  # a single path, not a list


# --- building blocks ----------------------------------------------------------------------------


def test_layer_groups():
    assert group_of("model.layers.12.mlp.up_proj.weight") == 12
    assert group_of("transformer.h.3.attn.c_attn.weight") == 3
    assert group_of("blocks.7.norm1.weight") == 7
    assert group_of("model.embed_tokens.weight") == "embed"
    assert group_of("transformer.wte.weight") == "embed"
    assert group_of("lm_head.weight") == "head"
    assert group_of("model.norm.weight") == "head"
    assert group_of("transformer.ln_f.weight") == "head"
    assert group_of("rotary.inv_freq") == "other"
    order = sorted(["head", 10, "other", 2, "embed"], key=group_order)
    assert order == ["embed", 2, 10, "head", "other"]


def _rows(size, seed, n=2):
    """A float32 base and `n` fine-tunes, and their float32 task vectors (as measured)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(size).astype(np.float32) + 3
    fts = [base + rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    return [base, *fts], [ft - base for ft in fts]


def test_chunks_sum_to_the_float64_figures(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK", 1000)
    monkeypatch.setattr(stats, "DOT", 300)  # blocks inside chunks, and a remainder
    rows, deltas = _rows(10_500, 0)
    rows[2][::3] = rows[0][::3]
    deltas[1][::3] = 0
    got = stats.tensor_stats(rows, (0.2, 0.6))
    r64 = [r.astype(np.float64) for r in (rows[0], *deltas)]
    want = np.array([[a @ b for b in r64] for a in r64])
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))  # error relative to the norms
    np.testing.assert_allclose(got.gram / scale, want / scale, rtol=0, atol=1e-7)
    for i, d in enumerate(r64[1:]):
        for k, density in enumerate((0.2, 0.6)):
            t = np.sort(np.abs(d))[-math.ceil(density * d.size)]
            keep = (np.abs(d) >= t) & (d != 0)
            assert got.kept[k, i] == pytest.approx(np.sum(d[keep] ** 2), rel=1e-6)
    both = (r64[1] != 0) & (r64[2] != 0)
    assert got.both[0, 1] == both.sum()
    assert got.conflicts[0, 1] == (both & (np.sign(r64[1]) != np.sign(r64[2]))).sum()


def test_release_covers_every_entry_once(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK", 100)
    monkeypatch.setattr(stats, "RELEASE", 250)
    rows, _ = _rows(1234, 3)
    seen = []
    stats.tensor_stats(rows, (0.5,), release=lambda lo, hi: seen.append((lo, hi)))
    assert seen[0][0] == 0 and seen[-1][1] == 1234
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))
    assert all(hi - lo >= 250 for lo, hi in seen[:-1])


def test_nested_selection_matches_partition():
    values = np.random.default_rng(5).standard_normal(1001).astype(np.float32)
    values[::7] = 0.5  # ties across the kths
    kths = [900, 100, 500, 500, 1000, 0]
    got, nth = stats._select(values, kths)
    ordered = np.sort(values)
    for kth in kths:
        assert nth[kth] == ordered[kth]
        assert np.all(got[:kth] <= nth[kth]) and np.all(got[kth:] >= nth[kth])
    np.testing.assert_array_equal(np.sort(got), ordered)


def test_large_tensors_measure_trimming_on_a_sample(monkeypatch):
    monkeypatch.setattr(stats, "SAMPLE", 20_000)
    size = 400_000
    rows, _ = _rows(size, 4)
    rows[2][::2] = rows[0][::2]  # a periodic pattern must not bias the stratified sample
    got = stats.tensor_stats(rows, (0.1, 0.4))
    monkeypatch.setattr(stats, "SAMPLE", size)
    exact = stats.tensor_stats(rows, (0.1, 0.4))
    # the exact sums do not depend on the sample
    np.testing.assert_array_equal(got.gram, exact.gram)
    np.testing.assert_array_equal(got.both, exact.both)
    np.testing.assert_array_equal(got.conflicts, exact.conflicts)
    # kept energy share and top-k conflict rate: estimates within a few standard errors
    np.testing.assert_allclose(got.kept / exact.kept, 1, atol=0.02)
    np.testing.assert_allclose(got.top_both / size, exact.top_both / size, atol=0.005)
    rate = got.top_conflicts[:, 0, 1] / got.top_both[:, 0, 1]
    exact_rate = exact.top_conflicts[:, 0, 1] / exact.top_both[:, 0, 1]
    np.testing.assert_allclose(rate, exact_rate, atol=0.03)
    assert exact.top_both[0, 0, 1] == pytest.approx(size * 0.1 * 0.1, rel=0.1)  # independent


def test_trimming_below_the_sample_size_is_exact_and_keeps_ties():
    base = np.zeros(8, np.float32)
    ft = np.array([0.5, -3, 0, 2, -1, 0.1, 0, 4], np.float32)
    st = stats.tensor_stats([base, ft], (0.25, 0.5, 1.0))
    total = float(np.sum(ft.astype(np.float64) ** 2))
    assert st.kept[:, 0] == pytest.approx([25.0, 30.0, total])
    tied = np.array([2, 2, 2, 1], np.float32)  # k = 1 at 0.25, but all three 2s tie
    st = stats.tensor_stats([np.zeros(4, np.float32), tied, -tied], (0.25,))
    assert st.kept[0, 0] == pytest.approx(12.0)
    assert st.top_both[0, 0, 1] == 3 and st.top_conflicts[0, 0, 1] == 3
    assert stats.top_k(8, 0.3) == 3 and stats.top_k(8, 0.01) == 1


def test_dense_trimming_never_keeps_zeros(tmp_path):
    d = gaussian(1)
    d = {n: np.where(np.arange(v.size).reshape(v.shape) % 4 == 0, v, 0) for n, v in d.items()}
    res = analyze(*family(tmp_path, [d, {n: -v for n, v in d.items()}])[:2], densities=(1.0,))
    pair = res.overall["pairs"][0]
    assert pair["overlap"] == pytest.approx(0.25, abs=0.01)
    assert pair["sign_conflict_top"]["1"] == 1.0
    assert res.overall["models"][0]["kept_energy"]["1"] == pytest.approx(1.0)
