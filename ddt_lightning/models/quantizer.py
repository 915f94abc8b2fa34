"""EMA vector quantizer for DDT tokens (DDT, arXiv 2504.14666, section 3.1 "Discrete tokenizer"; design.md section 1).

The encoder's `T` query outputs (dimension `m`) are snapped to the nearest of `K` codes (paper: K = 65,536, m = 16).
Codes are learned by exponential moving averages of the vectors assigned to them, with Laplace smoothing of the
cluster sizes (van den Oord et al. 2017, "Neural Discrete Representation Learning", appendix A.1; Razavi et al.
2019, VQ-VAE-2), gradients reach the encoder by the straight-through estimator, and the encoder is pulled towards
its codes by the commitment loss `beta * ||z - sg(q)||^2`. Options: cosine codes (inputs and codes l2-normalised)
and k-means initialisation on the first training batch.

Distributed: every statistic that changes the codebook is summed across ranks (`ddt_lightning.distributed`), so the
codebook stays identical on every rank without relying on DDP's buffer broadcast. Dead-code restarts are a side
effect and live in a callback (`ddt_lightning.callbacks.DeadCodeRestart`), which uses `restart_codes` here.

Nearest-code search (`nearest`) never builds the `(N, K)` distance matrix. With m = 16 a score is only 17
multiply-adds against 4 bytes written and read back, so the search works on cache-sized `(rows, tile)` score tiles:
scores `x . c - ||c||^2 / 2` come from one GEMM with the code norms folded in as an extra column (the `||x||^2` term
does not change the argmin), each tile is reduced with a vectorised `amax`, and only the winning tile of each row is
scored again to find the index (`max` with indices is about 15x slower than `amax` on CPU). Threads split the rows
and run single-threaded ops, as faiss does. On 2 cores (K = 65,536, 32,768 vectors) it matches faiss `IndexFlatL2`
(0.87 s vs 0.89 s, same indices): `python -m ddt_lightning.bench vq`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddt_lightning.distributed import all_reduce_mean_differentiable, all_reduce_sum, broadcast, rank

_RESCORE_ROWS = 128  # rows re-scored at once against their winning tile (128 x 17 x 256 floats: 2.2 MiB)


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, T, m), straight-through: forward value = codes, gradient = identity to the input
    indices: Tensor  # (B, T) long
    commit_loss: Tensor  # () commitment_weight * mse(z, sg(q))
    entropy_loss: Tensor  # () entropy_weight * (mean per-vector entropy - entropy of the batch's mean assignment)


def code_perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the distribution(s) given by non-negative `counts` along the last axis (..., K) -> (...,):
    K for uniform use of K codes, 1 for a single code, 0 where nothing was counted. Shared by the quantizer's
    training statistics and the evaluation metrics (`ddt_lightning.metrics.CodebookUsage`)."""
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp_min(1)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


@contextlib.contextmanager
def _single_threaded() -> Iterator[int]:
    """Run torch ops single-threaded inside the block (restoring the setting after); yields the previous setting.

    The quantizer's search and statistics are many small ops, and each intra-op parallel region waits for every
    OpenMP thread, which costs a scheduler time slice per op when other processes share the cores: measured here
    under load 2-4, the EMA update took 236 ms on 2 threads and 13 ms on 1, the search 30 s instead of 0.8 s.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # global in torch (and MKL)
    try:
        yield n_threads
    finally:
        torch.set_num_threads(n_threads)


def _search_rows(x_aug: Tensor, tiles: Tensor, out: Tensor, scores: Tensor, tile_max: Tensor, rescore: Tensor) -> None:
    """Nearest tiled code for rows `x_aug` (n, m + 1) against `tiles` (n_tiles, m + 1, C), written into `out` (n,).

    Work buffers come from the caller (allocated once per search, in the calling thread, so that each worker thread
    does not page-fault fresh memory): `scores` (R, C), `tile_max` (n_tiles, R), `rescore` (Q, m + 1, C).
    """
    n, C = x_aug.shape[0], tiles.shape[2]
    R, Q = scores.shape[0], rescore.shape[0]
    for r0 in range(0, n, R):
        xr = x_aug[r0 : r0 + R]  # (r, m + 1)
        r = xr.shape[0]
        s, tm = scores[:r], tile_max[:, :r]
        for j in range(tiles.shape[0]):
            torch.mm(xr, tiles[j], out=s)
            torch.amax(s, dim=1, out=tm[j])
        best_tile = tm.argmax(0)  # (r,)
        # Score each row again against its winning tile only, in cache-sized pieces, to get the index.
        for q0 in range(0, r, Q):
            bt = best_tile[q0 : q0 + Q]  # (q,)
            codes = torch.index_select(tiles, 0, bt, out=rescore[: bt.shape[0]])  # (q, m + 1, C), unlike tiles[bt]
            sc = torch.bmm(xr[q0 : q0 + Q].unsqueeze(1), codes).squeeze(1)  # (q, C)
            out[r0 + q0 : r0 + q0 + bt.shape[0]] = bt * C + sc.argmax(1)


def nearest_code(x: Tensor, codebook: Tensor, chunk: int = 1024, tile: int = 256) -> Tensor:
    """Index of the nearest row of `codebook` (K, m) for each row of `x` (N, m), by squared l2; returns (N,) long.

    Exact (the same indices as a brute-force argmin, ties aside). Each of `torch.get_num_threads()` threads owns a
    slice of the rows and never holds more than a (chunk, tile) score tile plus (K / tile, chunk) tile maxima.
    Threads split the rows and run single-threaded ops, like faiss, rather than using intra-op parallelism (see
    `_single_threaded`).
    """
    if torch.compiler.is_compiling():
        # Under torch.compile the hand-tiled, hand-threaded kernel runs eagerly, outside the graph: tracing its loops
        # buys nothing. (Not a decorator: `torch.compiler.disable` imports torch._dynamo, 2.4 s here, at import.)
        return torch.compiler.disable(_nearest_code)(x, codebook, chunk, tile)
    return _nearest_code(x, codebook, chunk, tile)


@torch.no_grad()
def _nearest_code(x: Tensor, codebook: Tensor, chunk: int, tile: int) -> Tensor:
    N, m = x.shape
    K = codebook.shape[0]
    x = x.to(codebook.dtype)
    C = min(tile, K)
    n_tiles = -(-K // C)
    # Scores s = x . c - ||c||^2 / 2 (argmax s == argmin ||x - c||^2): the norm rides in the GEMM as an extra
    # column, so a tile costs one mm and no extra pass. Padding codes score the lowest finite value.
    codes = codebook.new_zeros(n_tiles * C, m + 1)  # (K_pad, m + 1)
    codes[:K, :m] = codebook
    codes[:K, m] = codebook.square().sum(-1).mul_(-0.5)
    codes[K:, m] = torch.finfo(codes.dtype).min
    tiles = codes.view(n_tiles, C, m + 1).transpose(1, 2).contiguous()  # (n_tiles, m + 1, C)
    x_aug = torch.cat([x, x.new_ones(N, 1)], dim=1)  # (N, m + 1)
    out = torch.empty(N, dtype=torch.long, device=x.device)
    on_cpu = x.device.type == "cpu"  # accelerators: one stream of large-ish ops is the right shape there
    n_parts = max(1, min(torch.get_num_threads(), N // 256)) if on_cpu else 1  # >= 256 rows per thread
    bounds = [N * i // n_parts for i in range(n_parts + 1)]
    R = max(1, min(chunk, bounds[1]))
    Q = min(_RESCORE_ROWS, R)
    work = [
        (x.new_empty(R, C), x.new_empty(n_tiles, R), x.new_empty(Q, m + 1, C))  # scores, tile maxima, rescore
        for _ in range(n_parts)
    ]
    errors: list[BaseException] = []
    # Grad and inference modes are thread-local: the workers must run in the caller's, or writing into tensors
    # made under `torch.inference_mode` (Lightning's validation and test) is refused.
    inference = torch.is_inference_mode_enabled()

    def part(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        try:
            with torch.inference_mode(inference), torch.no_grad():
                _search_rows(x_aug[a:b], tiles, out[a:b], *work[i])
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)

    if not on_cpu:
        part(0)
        return out
    with _single_threaded():  # the workers start inside, so their ops are single-threaded too
        workers = [threading.Thread(target=part, args=(i,)) for i in range(1, n_parts)]
        for w in workers:
            w.start()
        part(0)
        for w in workers:
            w.join()
    if errors:
        raise errors[0]
    return out


class VectorQuantizer(nn.Module):
    """EMA vector quantizer with straight-through gradients, usage statistics and restart primitives.

    Args:
        codebook_size: number of codes K.
        dim: code dimension m.
        num_positions: number of token positions T (for the per-position usage counts).
        decay: EMA decay of cluster sizes and embedding sums.
        commitment_weight: beta in `beta * ||z - sg(q)||^2`.
        cosine: l2-normalise inputs and codes (distances become cosine distances).
        kmeans_init: initialise the codebook by k-means on the first training batch (if it holds >= K vectors,
            else from random encoder outputs of that batch).
        kmeans_iters: Lloyd iterations of that k-means.
        eps: Laplace smoothing of the EMA cluster sizes.
        search_chunk: rows of the input scored at once in `nearest` (the score tile is search_chunk x search_tile).
        search_tile: codes scored at once in `nearest`; with `search_chunk` sets the working set of the search.
        track_position_usage: keep per-position code counts (num_positions, K) for usage and perplexity per position.
        restart_buffer_size: size of the ring buffer of recent encoder outputs (restart candidates, local per rank).
        entropy_weight: weight of the code-entropy term (MAGVIT-v2's, Yu et al. 2024, on this codebook): with soft
            assignments p(code | z) = softmax(-||z - code||^2 / entropy_temperature), the mean entropy of each
            vector's assignment minus the entropy of the (global) batch's mean assignment. Minimising it makes each
            encoder output pick one code confidently and the batch spread over many: it pushes the encoder apart
            where a run stalls with every image on a few codes. 0 (the default) skips its cost entirely.
        entropy_temperature: temperature of those soft assignments, in squared-distance units.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        dim: int = 16,
        num_positions: int = 32,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        cosine: bool = True,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        eps: float = 1e-5,
        search_chunk: int = 1024,
        search_tile: int = 256,
        track_position_usage: bool = True,
        restart_buffer_size: int = 4096,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        for key, value in (
            ("codebook_size", codebook_size),
            ("dim", dim),
            ("num_positions", num_positions),
            ("search_chunk", search_chunk),
            ("search_tile", search_tile),
            ("restart_buffer_size", restart_buffer_size),
        ):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if entropy_weight < 0 or entropy_temperature <= 0:
            raise ValueError(
                f"entropy_weight must be >= 0 and entropy_temperature > 0, got {entropy_weight}, {entropy_temperature}"
            )

        self.codebook_size = codebook_size
        self.dim = dim
        self.num_positions = num_positions
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.cosine = cosine
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.search_chunk = search_chunk
        self.search_tile = search_tile
        self.track_position_usage = track_position_usage
        self.restart_buffer_size = restart_buffer_size
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature

        K, m = codebook_size, dim
        codebook = torch.randn(K, m)
        if cosine:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)  # (K, m)
        # EMA state starts as "each code has seen one vector equal to itself", so codebook == embed_sum / cluster_size
        # and codes that get no hits stay where they are instead of decaying towards zero.
        self.register_buffer("cluster_size", torch.ones(K))  # (K,)
        self.register_buffer("embed_sum", codebook.clone())  # (K, m)
        self.register_buffer("code_counts", torch.zeros(K, dtype=torch.long))  # (K,) hits since reset_usage()
        # float64 counts are exact to 2^53 and take a float32 increment in place (no (T, K) long temporary per step)
        self.register_buffer(
            "position_counts", torch.zeros(num_positions if track_position_usage else 0, K, dtype=torch.float64)
        )  # (T, K)
        self.register_buffer("window_hits", torch.zeros(K, dtype=torch.long))  # (K,) hits since the last restart check
        self.register_buffer("tokens_per_step", torch.zeros(()))  # tokens of the last training step, all ranks
        self.register_buffer("restart_buffer", torch.zeros(restart_buffer_size, m))  # (S, m) local, recent z
        self.register_buffer("restart_buffer_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("restart_buffer_count", torch.zeros((), dtype=torch.long))
        # One-time init on the first training batch (k-means, or rank 0's random codes) broadcast from rank 0, so
        # ranks agree however they were seeded. `_initted` mirrors the `initted` buffer: the only Python branch on
        # state in forward, and it survives a checkpoint load through the post hook.
        self._initted = False
        self.register_buffer("initted", torch.tensor(False))
        self.register_load_state_dict_post_hook(self._sync_initted)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, cosine={self.cosine}, decay={self.decay}"

    @staticmethod
    def _sync_initted(module: VectorQuantizer, incompatible_keys: object) -> None:
        module._initted = bool(module.initted)  # after load_state_dict: the buffer is the truth

    # ------------------------------------------------------------------ search

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the nearest code (squared l2) for each row of `x` (N, m); returns (N,) long."""
        return nearest_code(x, self.codebook, self.search_chunk, self.search_tile)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for `indices` of any shape (...) -> (..., m)."""
        return F.embedding(indices, self.codebook)

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> QuantizerOutput:
        B, T, m = z.shape
        if m != self.dim:
            raise ValueError(f"expected last dim == dim ({self.dim}), got {m}")
        if self.training and self.track_position_usage and T != self.num_positions:
            raise ValueError(f"expected T == num_positions ({self.num_positions}), got {T}")
        with torch.autocast(z.device.type, enabled=False):
            x = z.reshape(B * T, m).to(self.codebook.dtype)  # (N, m)
            if self.cosine:
                x = F.normalize(x, dim=-1)
            if self.training and not self._initted:
                self._init_codebook(x.detach())
            indices = self.nearest(x.detach())  # (N,)
            q = self.lookup(indices)  # (N, m)
            commit_loss = self.commitment_weight * F.mse_loss(x, q)  # q carries no gradient: it is sg(q)
            entropy_loss = x.new_zeros(())
            if self.training and self.entropy_weight > 0:
                entropy_loss = self.entropy_weight * self.code_entropy_gap(x)
            quantized = x + (q - x).detach()  # straight-through
            if self.training:
                self._update(x.detach(), indices, B, T)
        return QuantizerOutput(quantized.view(B, T, m).to(z.dtype), indices.view(B, T), commit_loss, entropy_loss)

    def code_entropy_gap(self, x: Tensor) -> Tensor:
        """Mean entropy of the soft assignments of the rows of `x` (N, m) minus the entropy of their mean, the mean
        taken over the global batch (all ranks); differentiable in `x`, the codebook held fixed. Costs an (N, K)
        distance matrix: meant for CPU-scale codebooks, not K = 65,536 with a large batch."""
        codes = self.codebook.clone()  # saved for backward: the EMA step then updates the codebook in place
        distances = x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.T + codes.pow(2).sum(1)  # (N, K)
        log_p = F.log_softmax(-distances / self.entropy_temperature, dim=-1)
        p = log_p.exp()
        per_vector = -(p * log_p).sum(-1).mean()
        mean_p = all_reduce_mean_differentiable(p.mean(0))  # (K,)
        batch = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return per_vector - batch

    @torch.no_grad()
    def _update(self, x: Tensor, indices: Tensor, B: int, T: int) -> None:
        """EMA codebook update and usage counters, with every statistic summed across ranks in one all-reduce."""
        with _single_threaded():  # a few dozen small ops: faster on one thread than paying an OpenMP barrier each
            self._update_stats(x, indices, B, T)

    def _update_stats(self, x: Tensor, indices: Tensor, B: int, T: int) -> None:
        K, m = self.codebook_size, self.dim
        P = T if self.track_position_usage else 0
        stats = x.new_zeros(K + K * m + P * K)  # [counts (K), sums (K, m), position counts (P, K)]
        counts = stats[:K]
        sums = stats[K : K + K * m].view(K, m)
        pos = stats[K + K * m :].view(P, K)
        counts.index_add_(0, indices, x.new_ones(indices.shape[0]))
        sums.index_add_(0, indices, x)
        if P:
            flat = (torch.arange(T, device=x.device) * K + indices.view(B, T)).view(-1)  # (N,) into (T * K)
            pos.view(-1).index_add_(0, flat, x.new_ones(flat.shape[0]))
        all_reduce_sum(stats)  # per-step counts are integers < 2^24: exact in float32

        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing, total preserved
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.cosine:
            self.codebook.copy_(F.normalize(self.codebook, dim=-1))

        hits = counts.long()
        self.window_hits += hits
        self.code_counts += hits
        if P:
            self.position_counts.add_(pos)
        self.tokens_per_step.copy_(counts.sum())
        self._push_restart_candidates(x)

    @torch.no_grad()
    def _push_restart_candidates(self, x: Tensor) -> None:
        """Write the newest encoder outputs (N, m) into the local ring buffer."""
        S = self.restart_buffer_size
        x = x[-S:]  # (n, m) with n <= S: the most recent ones
        n = x.shape[0]
        slots = (self.restart_buffer_ptr + torch.arange(n, device=x.device)) % S  # (n,)
        self.restart_buffer.index_copy_(0, slots, x)
        self.restart_buffer_ptr.copy_((self.restart_buffer_ptr + n) % S)
        self.restart_buffer_count.clamp_(max=S - n).add_(n)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def _init_codebook(self, x: Tensor) -> None:
        """One-time init on the first training batch: rank 0's codes (k-means of `x` (N, m) if enabled), broadcast."""
        if rank() == 0 and self.kmeans_init:
            codes = self._kmeans(x) if x.shape[0] >= self.codebook_size else self._sample(x, self.codebook_size)
            self.codebook.copy_(codes)
        broadcast(self.codebook, src=0)
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initted.fill_(True)
        self._initted = True

    def _sample(self, x: Tensor, k: int) -> Tensor:
        """`k` rows of `x` (N, m), each row used about k / N times (all distinct when N >= k)."""
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm.repeat(-(-k // x.shape[0]))[:k]]  # (k, m)

    def _kmeans(self, x: Tensor) -> Tensor:
        """Lloyd's k-means (spherical when cosine) of `x` (N, m) into K centroids; empty clusters keep theirs."""
        centroids = self._sample(x, self.codebook_size)  # (K, m)
        for _ in range(self.kmeans_iters):
            assign = nearest_code(x, centroids, self.search_chunk, self.search_tile)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (K, m)
            counts = torch.bincount(assign, minlength=self.codebook_size).unsqueeze(1)  # (K, 1)
            new = sums / counts.clamp_min(1)
            if self.cosine:
                new = F.normalize(new, dim=-1)
            centroids = torch.where(counts > 0, new, centroids)
        return centroids

    # ------------------------------------------------------------------ restarts and statistics

    @torch.no_grad()
    def restart_codes(self, code_ids: Tensor, new_vectors: Tensor) -> None:
        """Replace codes `code_ids` (n,) by `new_vectors` (n, m) and reset their EMA statistics and window hits.

        Callers must pass the same arguments on every rank (the callback gathers and broadcasts them).
        """
        new = new_vectors.to(self.codebook)
        if self.cosine:
            new = F.normalize(new, dim=-1)
        self.codebook.index_copy_(0, code_ids, new)
        self.embed_sum.index_copy_(0, code_ids, new)
        self.cluster_size.index_fill_(0, code_ids, 1.0)
        self.window_hits.index_fill_(0, code_ids, 0)

    def restart_candidates(self) -> Tensor:
        """The valid part of the local ring buffer of recent encoder outputs, (n, m)."""
        return self.restart_buffer[: int(self.restart_buffer_count)]

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero the usage counters (overall and per position); EMA statistics are untouched."""
        self.code_counts.zero_()
        self.position_counts.zero_()

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float | Tensor]:
        """Codebook usage since the last `reset_usage`.

        Returns `usage` (fraction of codes hit at least once), `perplexity` (exp entropy of the code distribution),
        and, with position tracking, `position_usage` / `position_perplexity` (T,) and their means.
        """
        counts = self.code_counts
        stats: dict[str, float | Tensor] = {
            "usage": float((counts > 0).double().mean()),
            "perplexity": float(code_perplexity(counts)),
        }
        if self.track_position_usage:
            pos_usage = (self.position_counts > 0).double().mean(-1)  # (T,)
            pos_ppl = code_perplexity(self.position_counts)  # (T,)
            stats |= {
                "position_usage": pos_usage,
                "position_perplexity": pos_ppl,
                "mean_position_usage": float(pos_usage.mean()),
                "mean_position_perplexity": float(pos_ppl.mean()),
            }
        return stats

    def expected_uniform_hits(self) -> Tensor:
        """Hits per code per step if all codes were used equally: tokens per step (all ranks) / K."""
        return self.tokens_per_step / self.codebook_size


__all__ = ["QuantizerOutput", "VectorQuantizer", "nearest_code"]
