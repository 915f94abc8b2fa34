"""VectorQuantizer: exact tiled search, EMA update, straight-through gradients, k-means init, usage, state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddt_lightning.models.quantizer import QuantizerOutput, VectorQuantizer, nearest_code


def _assert_nearest(x: torch.Tensor, codes: torch.Tensor, got: torch.Tensor) -> None:
    """`got` is a brute-force argmin, or ties with it to float tolerance."""
    dist = torch.cdist(x.double(), codes.double())  # (N, K)
    ref = dist.argmin(1)
    differ = got != ref
    assert differ.float().mean() < 0.01
    rows = differ.nonzero().squeeze(1)
    torch.testing.assert_close(dist[rows, got[rows]], dist[rows, ref[rows]], rtol=0, atol=1e-5)


def _vq(**kwargs) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(**kwargs)


@pytest.mark.parametrize(
    ("n", "k", "chunk", "tile"),
    [
        (1000, 777, 8192, 256),  # K not a multiple of the tile: padded codes must never win
        (1000, 777, 100, 50),  # many row chunks and tiles
        (513, 64, 7, 13),  # odd chunk and tile, rows split unevenly between threads
        (300, 1, 64, 256),  # a single code
        (1, 100, 1, 1),  # a single row, tile of one code
        (3000, 5000, 1024, 256),  # threaded split, several chunks per thread
    ],
)
def test_nearest_matches_brute_force(n: int, k: int, chunk: int, tile: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    x, codes = torch.randn(n, 16, generator=g), torch.randn(k, 16, generator=g)
    threads = torch.get_num_threads()
    got = nearest_code(x, codes, chunk, tile)
    assert got.shape == (n,) and got.dtype == torch.long
    _assert_nearest(x, codes, got)
    assert torch.get_num_threads() == threads  # the search restores the thread setting


def test_nearest_method_uses_configured_tiles() -> None:
    vq = _vq(codebook_size=300, dim=8, cosine=False, search_chunk=33, search_tile=17)
    x = torch.randn(500, 8)
    _assert_nearest(x, vq.codebook, vq.nearest(x))


def test_nearest_non_uniform_norms() -> None:
    # The folded -||c||^2 / 2 term matters when code norms differ: a dot-product argmax would pick the long code.
    codes = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[1.2, 0.0], [6.0, 0.0], [-3.0, 0.0]])
    assert nearest_code(x, codes).tolist() == [0, 1, 0]


def test_ema_update_hand_case() -> None:
    decay, eps = 0.9, 1e-5
    vq = _vq(codebook_size=2, dim=2, num_positions=3, decay=decay, eps=eps, cosine=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        vq.embed_sum.copy_(vq.codebook)
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # (1, 3, 2): two vectors to code 0, one to code 1
    out = vq.train()(z)
    assert out.indices.tolist() == [[0, 0, 1]]
    # Cluster sizes 0.9 * 1 + 0.1 * [2, 1]; sums 0.9 * code + 0.1 * [[1, 1], [9, 9]]; Laplace smoothing over n = 2.1.
    size = torch.tensor([1.1, 1.0])
    sums = torch.tensor([[0.1, 0.1], [9.9, 9.9]])
    smoothed = (size + eps) / (2.1 + 2 * eps) * 2.1
    torch.testing.assert_close(vq.cluster_size, size)
    torch.testing.assert_close(vq.embed_sum, sums)
    torch.testing.assert_close(vq.codebook, sums / smoothed[:, None])
    assert vq.codebook[0, 0] == pytest.approx(0.1 / 1.1, rel=1e-4)  # 1/11 of the way to the mean (0.5, 0.5)
    for _ in range(300):  # the same batch again and again: codes converge to the means of their clusters
        vq(z)
    torch.testing.assert_close(vq.codebook, torch.tensor([[0.5, 0.5], [9.0, 9.0]]), atol=1e-3, rtol=0)


def test_straight_through_and_commitment_loss() -> None:
    vq = _vq(codebook_size=16, dim=4, num_positions=5, cosine=False, commitment_weight=0.25).eval()
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (3, 5, 4) and out.indices.shape == (3, 5)
    q = vq.lookup(out.indices)  # (3, 5, 4)
    torch.testing.assert_close(out.quantized, q)
    torch.testing.assert_close(out.commit_loss, 0.25 * F.mse_loss(z, q))
    (out.quantized * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(4.0).expand(3, 5, 4))  # identity gradient
    z.grad = None
    vq(z).commit_loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - q).detach() / z.numel())  # sg(q): only z moves


def test_cosine_gradient_and_unit_codes() -> None:
    vq = _vq(codebook_size=32, dim=8, num_positions=4, cosine=True).train()
    z = (3 * torch.randn(16, 4, 8)).requires_grad_(True)
    out = vq(z)
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(16, 4))
    out.quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for _ in range(5):
        vq(3 * torch.randn(16, 4, 8) + 1)
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(32))
    vq.restart_codes(torch.tensor([0, 5]), torch.tensor([[2.0] * 8, [-1.0] * 8]))
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(32))


def test_kmeans_init_finds_clusters() -> None:
    g = torch.Generator().manual_seed(1)
    centers = 10 * torch.randn(4, 4, generator=g)  # (4, 4) well separated
    x = centers.repeat(32, 1) + 0.3 * torch.randn(128, 4, generator=g)  # (128, 4): 32 points per cluster

    def init(iters: int) -> VectorQuantizer:
        vq = _vq(codebook_size=16, dim=4, num_positions=4, cosine=False, kmeans_init=True, kmeans_iters=iters)
        assert not vq._initted and not bool(vq.initted)
        vq.eval()(x.view(32, 4, 4))
        assert not vq._initted  # no init outside training
        vq.train()(x.view(32, 4, 4))
        assert vq._initted and bool(vq.initted)
        return vq

    sampled, kmeans = init(0), init(10)  # the same seed: k-means starts from the sampled codes

    def distortion(vq: VectorQuantizer) -> float:
        return float(torch.cdist(x, vq.codebook).min(1).values.square().mean())

    assert torch.cdist(centers, kmeans.codebook).min(1).values.max() < 1.0  # a code at every cluster
    assert torch.cdist(kmeans.codebook, centers).min(1).values.max() < 1.0  # no code stranded between clusters
    assert distortion(kmeans) < 0.7 * distortion(sampled)  # Lloyd's iterations did their job


def test_small_first_batch_falls_back_to_encoder_outputs() -> None:
    vq = _vq(codebook_size=64, dim=4, num_positions=4, cosine=False, kmeans_init=True)
    z = torch.randn(5, 4, 4)  # 20 vectors < 64 codes
    vq.train()(z)
    # Every code is one of the batch's vectors (each vector is its own nearest code, so EMA leaves them in place).
    assert torch.cdist(vq.codebook.double(), z.view(-1, 4).double()).min(1).values.max() < 1e-5


def test_usage_stats_on_known_indices() -> None:
    vq = _vq(codebook_size=4, dim=2, num_positions=2, cosine=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
        vq.embed_sum.copy_(vq.codebook)
    idx = torch.tensor([[0, 1], [0, 2]])  # (B=2, T=2)
    out = vq.train()(vq.codebook[idx].clone())
    assert torch.equal(out.indices, idx)
    stats = vq.usage_stats()
    assert stats["usage"] == pytest.approx(3 / 4)
    assert stats["perplexity"] == pytest.approx(2**1.5)  # p = (1/2, 1/4, 1/4)
    torch.testing.assert_close(stats["position_usage"], torch.tensor([0.25, 0.5], dtype=torch.float64))
    torch.testing.assert_close(stats["position_perplexity"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert stats["mean_position_usage"] == pytest.approx(0.375)
    vq.reset_usage()
    stats = vq.usage_stats()
    assert stats["usage"] == 0 and stats["perplexity"] == 0 and stats["mean_position_usage"] == 0


def test_eval_mode_changes_no_state() -> None:
    vq = _vq(codebook_size=16, dim=4, num_positions=4).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(8, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_training_counters_and_ring_buffer() -> None:
    vq = _vq(codebook_size=16, dim=4, num_positions=4, restart_buffer_size=10, cosine=False).train()
    z1, z2 = torch.randn(2, 4, 4), torch.randn(1, 4, 4)
    vq(z1)
    vq(z2)
    assert int(vq.window_hits.sum()) == int(vq.code_counts.sum()) == 12
    assert int(vq.position_counts.sum()) == 12 and vq.position_counts.sum(1).tolist() == [3, 3, 3, 3]
    assert float(vq.tokens_per_step) == 4
    # 12 vectors through a 10-slot ring: the newest 10 are held, in ring order.
    assert int(vq.restart_buffer_count) == 10 and int(vq.restart_buffer_ptr) == 2
    newest = torch.cat([z1.view(-1, 4), z2.view(-1, 4)])[2:]  # (10, 4)
    torch.testing.assert_close(torch.cat([vq.restart_buffer[2:], vq.restart_buffer[:2]]), newest)
    torch.testing.assert_close(vq.restart_candidates(), vq.restart_buffer)


def test_restart_codes_resets_statistics() -> None:
    vq = _vq(codebook_size=8, dim=3, num_positions=2, cosine=False).train()
    for _ in range(3):
        vq(torch.randn(4, 2, 3))
    keep = [i for i in range(8) if i not in (1, 6)]
    before = {k: getattr(vq, k).clone() for k in ("codebook", "cluster_size", "embed_sum")}
    new = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    vq.restart_codes(torch.tensor([1, 6]), new)
    torch.testing.assert_close(vq.codebook[[1, 6]], new)
    torch.testing.assert_close(vq.embed_sum[[1, 6]], new)
    assert vq.cluster_size[[1, 6]].tolist() == [1.0, 1.0] and vq.window_hits[[1, 6]].tolist() == [0, 0]
    for key, value in before.items():
        assert torch.equal(getattr(vq, key)[keep], value[keep])


def test_state_dict_round_trip_is_exact() -> None:
    vq = _vq(codebook_size=32, dim=4, num_positions=4, kmeans_init=True, restart_buffer_size=16).train()
    for _ in range(3):
        vq(torch.randn(16, 4, 4))
    state = vq.state_dict()
    expected = {"codebook", "cluster_size", "embed_sum", "code_counts", "position_counts", "window_hits"}
    expected |= {"tokens_per_step", "restart_buffer", "restart_buffer_ptr", "restart_buffer_count", "initted"}
    assert set(state) == expected
    torch.manual_seed(123)  # a different random init, not yet initialised
    resumed = VectorQuantizer(codebook_size=32, dim=4, num_positions=4, kmeans_init=True, restart_buffer_size=16)
    assert not resumed._initted
    resumed.load_state_dict(state)
    assert resumed._initted  # the Python mirror follows the buffer: no second k-means on resume
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in state.items())
    z = torch.randn(16, 4, 4)
    a, b = vq(z), resumed.train()(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in vq.state_dict().items())


@pytest.mark.parametrize(
    ("key", "value"),
    [("codebook_size", 0), ("dim", 0), ("decay", 1.0), ("eps", 0.0), ("search_chunk", 0), ("kmeans_iters", -1)],
)
def test_invalid_arguments_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        VectorQuantizer(**{key: value})


def test_wrong_shapes_are_refused() -> None:
    vq = _vq(codebook_size=8, dim=4, num_positions=4).train()
    with pytest.raises(ValueError, match="dim"):
        vq(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="num_positions"):
        vq(torch.randn(2, 5, 4))


def test_perplexity_of_uniform_usage_is_codebook_size() -> None:
    vq = _vq(codebook_size=8, dim=2, num_positions=1, track_position_usage=False, cosine=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.stack([torch.arange(8.0) * 10, torch.zeros(8)], 1))
        vq.embed_sum.copy_(vq.codebook)
    vq.train()(vq.codebook.clone().view(8, 1, 2))
    stats = vq.usage_stats()
    assert stats["usage"] == 1.0 and stats["perplexity"] == pytest.approx(8.0)
    assert "position_usage" not in stats and vq.position_counts.shape == (0, 8)
    assert math.isfinite(stats["perplexity"])


def test_threaded_search_works_under_inference_mode() -> None:
    """Lightning validates and tests under `torch.inference_mode`, which worker threads do not inherit."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            x, codebook = torch.randn(2048, 16), torch.randn(1024, 16)
            got = nearest_code(x, codebook)
        assert torch.equal(got, torch.cdist(x, codebook).argmin(1))
    finally:
        torch.set_num_threads(threads)


def test_code_entropy_gap_values_and_its_pull_apart() -> None:
    vq = _vq(codebook_size=8, dim=4, num_positions=1, entropy_weight=1.0, entropy_temperature=1e-4)
    codes = vq.codebook
    # Each vector on its own code, confidently: per-vector entropy 0, batch entropy log 8.
    torch.testing.assert_close(vq.code_entropy_gap(codes.clone()), torch.tensor(-math.log(8)), atol=1e-4, rtol=0)
    # Every vector on one code: both entropies 0.
    torch.testing.assert_close(vq.code_entropy_gap(codes[:1].repeat(8, 1)), torch.tensor(0.0), atol=1e-4, rtol=0)
    # Two vectors near code 0, each leaning to another code: a gradient step on the gap moves them apart.
    vq.entropy_temperature = 0.5
    x = (codes[0] + 0.1 * torch.stack([codes[1] - codes[0], codes[2] - codes[0]])).requires_grad_()
    vq.code_entropy_gap(x).backward()
    moved = x.detach() - 0.05 * x.grad
    assert (moved[0] - moved[1]).norm() > (x[0] - x[1]).detach().norm()


def test_entropy_term_in_forward_only_when_training_with_a_weight() -> None:
    z = torch.randn(4, 2, 4, requires_grad=True)
    off = _vq(codebook_size=8, dim=4, num_positions=2).train()(z)
    assert torch.equal(off.entropy_loss, torch.zeros(()))
    vq = _vq(codebook_size=8, dim=4, num_positions=2, entropy_weight=0.5).train()
    seen, gap = {}, vq.code_entropy_gap
    vq.code_entropy_gap = lambda x: seen.setdefault("gap", (x, gap(x)))[1]  # before the EMA step moves the codes
    out = vq(z)
    torch.testing.assert_close(seen["gap"][0], F.normalize(z.reshape(8, 4), dim=-1))  # the normalised inputs
    assert torch.equal(out.entropy_loss, 0.5 * seen["gap"][1]) and out.entropy_loss < 0
    out.entropy_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.equal(vq.eval()(z).entropy_loss, torch.zeros(()))
    with pytest.raises(ValueError, match="entropy_temperature"):
        VectorQuantizer(entropy_temperature=0.0)


def _entropy_rank(rank: int, world: int, store: str, x: torch.Tensor, codebook: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    vq = VectorQuantizer(codebook_size=codebook.shape[0], dim=codebook.shape[1], entropy_temperature=0.1)
    vq.codebook.copy_(codebook)
    part = x.chunk(world)[rank].clone().requires_grad_()
    gap = vq.code_entropy_gap(part)
    gap.backward()
    torch.save({"gap": gap.detach(), "grad": part.grad}, f"{out}{rank}.pt")
    # Both ranks reach here before either tears gloo down: a rank that destroys its group while its peer is still
    # talking to it can abort the peer ("terminate called without an active exception", seen once in CI).
    dist.barrier()
    dist.destroy_process_group()


def test_code_entropy_gap_uses_the_global_batch_across_ranks(tmp_path) -> None:
    # Two gloo ranks, each with half the batch: the mean of their gaps is the one-process gap of the whole batch,
    # and each rank's gradient is world x the one-process gradient (DDP's gradient averaging divides it back).
    torch.manual_seed(0)
    x, codebook = F.normalize(torch.randn(64, 4), dim=-1), F.normalize(torch.randn(16, 4), dim=-1)
    torch.multiprocessing.spawn(
        _entropy_rank, args=(2, str(tmp_path / "store"), x, codebook, str(tmp_path / "rank")), nprocs=2
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    vq = VectorQuantizer(codebook_size=16, dim=4, entropy_temperature=0.1)
    vq.codebook.copy_(codebook)
    whole = x.clone().requires_grad_()
    gap = vq.code_entropy_gap(whole)
    gap.backward()
    torch.testing.assert_close((ranks[0]["gap"] + ranks[1]["gap"]) / 2, gap.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), 2 * whole.grad)
