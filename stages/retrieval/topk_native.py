"""The CPU path of `chunked_topk`: block products and selection fused per thread, the selection a numba kernel.

Each of T threads (T = torch's intra-op threads) takes query rows query_chunk / T at a time and runs its own
single-threaded oneDNN block product against every gallery block, selecting from each block right after it is
computed; the threads never wait on each other. Per query row the kernel keeps a buffer of candidates (score,
gallery row), in gallery order, and a threshold t: only scores above t become candidates.

* A fresh row's t comes from its first block: the rank-th largest of 512 group maxima (a vertical maximum over
  the block, one instruction per 16 scores), so that block appends about rank scores, not all of them.
* A block row is read in groups of 64 scores; one vectorised comparison tells whether any beats t (after the
  first blocks few do), and a group that has one is appended whole with AVX-512 compress stores (LLVM's scalar
  expansion of them on other CPUs): no branch per score. A row that took many scores from its last block
  appends every group untested (a test that goes either way at random costs more than it saves).
* When the buffer fills, its rank-th best is found by bisection on the value (each step one vectorised count,
  over the scores still between the bounds once they are few) and the scores at or above it are compacted in
  place, in order; t becomes that value. Scores equal to t are not appended afterwards: rank of them score as
  high already (which of several rows tied at the k-th place is kept is not defined).
* rank is k, or, where k's share of the scores seen so far (k * seen / gallery rows) is 16 or more, that share
  plus four standard deviations of a Poisson count and two: an estimate of the row's k-th best over the whole
  gallery, well below it. With k large against the gallery, the scores appended are then about
  k (1 + 4 / sqrt(share)) instead of k (1 + ln(gallery / k)). Exactness does not rest on the estimate: a row
  that ends with fewer than k candidates (about one in 10^4 on random data; many if the gallery is ordered
  against the query) is searched again with rank k throughout.
* At the end each row keeps exactly k (the first in gallery order of several tied at the k-th place), as
  64-bit keys (score order, gallery row) sorted by numpy (x86-simd-sort on AVX-512): best first, equal scores
  by gallery row.

-inf (excluded rows) and NaN never beat a threshold: they are never candidates, and a row with fewer than k
finite scores gets -inf and -1 in the places left over. `available()` is False when numba cannot be imported;
chunked_topk then selects with torch ops and says so once.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError as err:  # pragma: no cover - exercised by monkeypatching `available`
    numba = None
    _IMPORT_ERROR = err

LANES = 16  # one AVX-512 vector of float32
GROUP = 4 * LANES  # scores tested at once before any is appended
GROUPS = 512  # groups whose maxima bound a fresh row's k-th best (k <= GROUPS / 2)
DENSE = 128  # a row appends without group tests after a block where it took more than 1 score in DENSE
MIN_SHARE = 16.0  # scores seen so far expected among the row's final k best, needed to estimate its k-th best


def available() -> bool:
    """Whether numba imports (the caller logs the fallback)."""
    return numba is not None


def import_error() -> str:
    return "" if numba is not None else str(_IMPORT_ERROR)


if numba is not None:
    from llvmlite import binding

    _AVX512 = bool(binding.get_host_cpu_features().get("avx512f"))  # numba compiles for this CPU
    # compiled once, then cached beside this file (__pycache__), for this CPU
    _jit = functools.partial(numba.njit, nogil=True, cache=True, boundscheck=False)
    _F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    _VF, _VI, _VM = ir.VectorType(_F32, LANES), ir.VectorType(_I32, LANES), ir.VectorType(ir.IntType(1), LANES)

    def _splat(builder, value, vector_type):
        one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(_VI, [0] * LANES))

    def _load(context, builder, array_type, array, offset, vector_type):
        data = context.make_array(array_type)(context, builder, array).data
        return builder.load(builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer()), align=4)

    def _masked_load(context, builder, array_type, array, offset, mask):
        """array[offset : offset + 16] as a vector, only the lanes under mask read (the others -inf): no read
        beyond an array's end."""
        data = context.make_array(array_type)(context, builder, array).data
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VF, [_VF.as_pointer(), _I32, _VM, _VF]), f"llvm.masked.load.v{LANES}f32.p0")
        pointer = builder.bitcast(builder.gep(data, [offset]), _VF.as_pointer())
        return builder.call(function, [pointer, ir.Constant(_I32, 4), mask, ir.Constant(_VF, [float("-inf")] * LANES)])

    def _compress_store(builder, values, vector_type, element_type, context, array_type, array, offset, mask):
        """Stores the lanes of `values` under `mask`, packed, at array[offset:]: AVX-512's register compress and
        a whole-vector store where the CPU has it (16 slots of room at offset; the memory form is slower on
        some CPUs), else LLVM's compressstore (lowered to scalar stores)."""
        data = builder.gep(context.make_array(array_type)(context, builder, array).data, [offset])
        suffix = f"v{LANES}{'f32' if element_type is _F32 else 'i32'}"
        if _AVX512:
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector_type, [vector_type, vector_type, _VM]),
                f"llvm.x86.avx512.mask.compress.{suffix}")
            packed = builder.call(function, [values, ir.Constant(vector_type, None), mask])
            builder.store(packed, builder.bitcast(data, vector_type.as_pointer()), align=4)
        else:
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [vector_type, element_type.as_pointer(), _VM]),
                f"llvm.masked.compressstore.{suffix}")
            builder.call(function, [values, data, mask])

    def _lanes_below(builder, remaining):
        """The lanes whose index is below `remaining` (an int64)."""
        bound = _splat(builder, builder.trunc(remaining, _I32), _VI)
        return builder.icmp_signed("<", ir.Constant(_VI, list(range(LANES))), bound)

    def _popcount(builder, mask):
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(LANES), [ir.IntType(LANES)]), f"llvm.ctpop.i{LANES}")
        return builder.zext(builder.call(function, [builder.bitcast(mask, ir.IntType(LANES))]), _I64)

    @intrinsic
    def _append_above(typingctx, row, j, t, scores, columns, n, g0):
        """Appends row[j : j + 16] > t to scores[n:] (their gallery rows g0 + j + lane to columns[n:]), in order,
        with compress stores; returns the new n. j + 16 <= len(row); 16 slots of room at n."""
        signature = types.int64(row, j, t, scores, columns, n, g0)

        def codegen(context, builder, sig, args):
            row_v, j_v, t_v, scores_v, columns_v, n_v, g0_v = args
            values = _load(context, builder, sig.args[0], row_v, j_v, _VF)
            mask = builder.fcmp_ordered(">", values, _splat(builder, t_v, _VF))
            _compress_store(builder, values, _VF, _F32, context, sig.args[3], scores_v, n_v, mask)
            first = builder.trunc(builder.add(g0_v, j_v), _I32)
            rows = builder.add(_splat(builder, first, _VI), ir.Constant(_VI, list(range(LANES))))
            _compress_store(builder, rows, _VI, _I32, context, sig.args[4], columns_v, n_v, mask)
            return builder.add(n_v, _popcount(builder, mask))

        return signature, codegen

    @intrinsic
    def _compact_at_least(typingctx, scores, columns, p, remaining, t, n):
        """Moves scores[p : p + 16] >= t (lanes < remaining only) and their columns to position n, in order;
        returns the new n (n <= p: in place)."""
        signature = types.int64(scores, columns, p, remaining, t, n)

        def codegen(context, builder, sig, args):
            scores_v, columns_v, p_v, remaining_v, t_v, n_v = args
            values = _load(context, builder, sig.args[0], scores_v, p_v, _VF)
            rows = _load(context, builder, sig.args[1], columns_v, p_v, _VI)
            lanes = _lanes_below(builder, remaining_v)
            mask = builder.and_(builder.fcmp_ordered(">=", values, _splat(builder, t_v, _VF)), lanes)
            _compress_store(builder, values, _VF, _F32, context, sig.args[0], scores_v, n_v, mask)
            _compress_store(builder, rows, _VI, _I32, context, sig.args[1], columns_v, n_v, mask)
            return builder.add(n_v, _popcount(builder, mask))

        return signature, codegen

    @intrinsic
    def _any_above(typingctx, row, j, t):
        """Whether any of row[j : j + 64] is > t (four vector comparisons, one test)."""
        signature = types.boolean(row, j, t)

        def codegen(context, builder, sig, args):
            row_v, j_v, t_v = args
            bound = _splat(builder, t_v, _VF)
            hit = None
            for lane in range(0, GROUP, LANES):
                offset = builder.add(j_v, ir.Constant(_I64, lane))
                above = builder.fcmp_ordered(">", _load(context, builder, sig.args[0], row_v, offset, _VF), bound)
                hit = above if hit is None else builder.or_(hit, above)
            return builder.icmp_unsigned("!=", builder.bitcast(hit, ir.IntType(LANES)), ir.Constant(ir.IntType(LANES), 0))

        return signature, codegen

    @intrinsic
    def _count16_at_least(typingctx, scores, p, remaining, t):
        """How many of scores[p : p + 16] (lanes < remaining only) are >= t."""
        signature = types.int64(scores, p, remaining, t)

        def codegen(context, builder, sig, args):
            scores_v, p_v, remaining_v, t_v = args
            lanes = _lanes_below(builder, remaining_v)
            values = _masked_load(context, builder, sig.args[0], scores_v, p_v, lanes)
            return _popcount(builder, builder.and_(builder.fcmp_ordered(">=", values, _splat(builder, t_v, _VF)), lanes))

        return signature, codegen

    def _reduction(largest: bool):
        """An intrinsic f(scores, n, t): the largest (largest=True) or smallest of the scores[:n] that are >= t,
        -inf / +inf if none; one vector comparison and min/max per 16 scores (numba's own loops stay scalar)."""

        @intrinsic
        def reduce(typingctx, scores, n, t):
            signature = types.float32(scores, n, t)

            def codegen(context, builder, sig, args):
                scores_v, n_v, t_v = args
                empty = ir.Constant(_VF, [float("-inf") if largest else float("inf")] * LANES)
                bound = _splat(builder, t_v, _VF)
                accumulator = cgutils.alloca_once_value(builder, empty)
                with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), n_v, ir.Constant(_I64, LANES)) as (p, _):
                    lanes = _lanes_below(builder, builder.sub(n_v, p))
                    values = _masked_load(context, builder, sig.args[0], scores_v, p, lanes)
                    values = builder.select(builder.fcmp_ordered(">=", values, bound), values, empty)
                    so_far = builder.load(accumulator)
                    better = builder.fcmp_ordered(">" if largest else "<", values, so_far)
                    builder.store(builder.select(better, values, so_far), accumulator)
                name = f"llvm.vector.reduce.{'fmax' if largest else 'fmin'}.v{LANES}f32"
                function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_VF]), name)
                return builder.call(function, [builder.load(accumulator)])

            return signature, codegen

        return reduce

    _largest_at_least = _reduction(True)
    _smallest_at_least = _reduction(False)

    @intrinsic
    def _group_maxima(typingctx, row, width, out):
        """Writes to out[:GROUPS] the maxima of GROUPS disjoint groups of row[:width] (lane l of vectors
        a, a + GROUPS / 16, ...: a vertical max, one instruction per 16 scores); -inf for an empty group."""
        signature = types.none(row, width, out)
        accumulators = GROUPS // LANES

        def codegen(context, builder, sig, args):
            row_v, width_v, out_v = args
            empty = ir.Constant(_VF, [float("-inf")] * LANES)
            slots = [cgutils.alloca_once_value(builder, empty) for _ in range(accumulators)]
            with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), width_v, ir.Constant(_I64, GROUPS)) as (p, _):
                for a, slot in enumerate(slots):
                    offset = builder.add(p, ir.Constant(_I64, a * LANES))
                    lanes = _lanes_below(builder, builder.sub(width_v, offset))
                    values = _masked_load(context, builder, sig.args[0], row_v, offset, lanes)
                    so_far = builder.load(slot)
                    builder.store(builder.select(builder.fcmp_ordered(">", values, so_far), values, so_far), slot)
            data = context.make_array(sig.args[2])(context, builder, out_v).data
            for a, slot in enumerate(slots):
                target = builder.bitcast(builder.gep(data, [ir.Constant(_I64, a * LANES)]), _VF.as_pointer())
                builder.store(builder.load(slot), target, align=4)
            return context.get_dummy_value()

        return signature, codegen

    @intrinsic
    def _pack16_between(typingctx, scores, p, remaining, low, high, out, m):
        """Appends the scores[p : p + 16] in [low, high) (lanes < remaining only) to out[m:], packed; returns
        the new m (16 writable slots at m)."""
        signature = types.int64(scores, p, remaining, low, high, out, m)

        def codegen(context, builder, sig, args):
            scores_v, p_v, remaining_v, low_v, high_v, out_v, m_v = args
            lanes = _lanes_below(builder, remaining_v)
            values = _masked_load(context, builder, sig.args[0], scores_v, p_v, lanes)
            inside = builder.and_(builder.fcmp_ordered(">=", values, _splat(builder, low_v, _VF)),
                                  builder.fcmp_ordered("<", values, _splat(builder, high_v, _VF)))
            mask = builder.and_(inside, lanes)
            _compress_store(builder, values, _VF, _F32, context, sig.args[5], out_v, m_v, mask)
            return builder.add(m_v, _popcount(builder, mask))

        return signature, codegen

    @_jit
    def _count_at_least(scores, n, t):  # pragma: no cover - compiled
        """How many of scores[:n] are >= t (NaN never); len(scores) >= n rounded up to 16."""
        count = 0
        for p in range(0, n, LANES):
            count += _count16_at_least(scores, p, n - p, t)
        return count

    @intrinsic
    def _bits(typingctx, x):
        """The bits of a float32 as a uint32."""
        return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], _I32)

    @intrinsic
    def _float(typingctx, bits):
        """The float32 with these bits (a uint32)."""
        return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], _F32)

    @_jit
    def _ascending_key(x):  # pragma: no cover - compiled
        """A uint32 in the order of the float32 x (no NaN; -0.0 as 0.0)."""
        b = _bits(x + np.float32(0.0))
        return b ^ np.uint32(0x80000000) if b < np.uint32(0x80000000) else ~b

    @_jit
    def _float_of_key(key):  # pragma: no cover - compiled
        return _float(key ^ np.uint32(0x80000000) if key >= np.uint32(0x80000000) else ~key)

    @_jit
    def _kth_best(scores, n, k, low, high, scratch):  # pragma: no cover - compiled
        """The k-th largest of scores[:n], NaN ignored, given count(>= low) >= k and high >= the largest:
        bisection on the values' order keys, each step one vectorised count, stopping when exactly k are at or
        above the probe. Once the scores between the bounds are few (an eighth), they are packed into scratch
        (len >= n + 16) and the search goes on over them alone."""
        if high == np.inf:
            high = _largest_at_least(scores, n, np.float32(-np.inf))
        if low == -np.inf:  # the smallest finite score (callers make sure that k are finite)
            low = _smallest_at_least(scores, n, np.nextafter(np.float32(-np.inf), np.float32(0)))
        count_high = _count_at_least(scores, n, high)
        if count_high >= k:
            return high
        count_low = _count_at_least(scores, n, low)
        low_key, high_key = _ascending_key(low), _ascending_key(high)
        values, m, above = scores, n, 0
        # count(>= low) = count_low >= k > count_high = count(>= high), counted over values[:m] plus, once
        # packed, the `above` scores above those
        while high_key - low_key > np.uint32(1):
            if m == n and 8 * (count_low - count_high) <= n and n > 8 * LANES:
                m = 0
                for p in range(0, n, LANES):
                    m = _pack16_between(scores, p, n - p, low, high, scratch, m)
                values, above = scratch, count_high
            middle_key = low_key + (high_key - low_key) // np.uint32(2)
            middle = _float_of_key(middle_key)
            count = _count_at_least(values, m, middle) + above
            if count == k:  # the smallest of the k at or above the probe
                return _smallest_at_least(values, m, middle)
            if count > k:
                low_key, low, count_low = middle_key, middle, count
            else:
                high_key, high, count_high = middle_key, middle, count
        return low

    @_jit
    def _rank(k, seen, n_gallery, estimate):  # pragma: no cover - compiled
        """How many of the best scores seen so far to keep: k, or, where `estimate` and k's share of the seen
        scores (k * seen / n_gallery, a count with about Poisson spread) is large enough, that share plus four
        standard deviations and two: the row's k-th best over the whole gallery is then below the kept ones'
        smallest about once in 10^4 rows (caught at the end, see fused_topk)."""
        share = k * seen / n_gallery
        if not estimate or share < MIN_SHARE:
            return k
        return min(k, np.int64(np.ceil(share + 4.0 * np.sqrt(share) + 2.0)))

    @_jit
    def _shrink(scores, columns, n, rank, low, exact, scratch):  # pragma: no cover - compiled
        """Keeps, in order, the `rank` best of scores[:n] (all scores >= low) and the scores equal to the
        rank-th, unless exact or they are many: then only the first of those. Returns (kept, the rank-th)."""
        kth = _kth_best(scores, n, rank, low, _largest_at_least(scores, n, np.float32(-np.inf)), scratch)
        at_least = _count_at_least(scores, n, kth)
        if at_least == rank or (not exact and at_least <= rank + rank // 2):
            kept = 0
            for p in range(0, n, LANES):
                kept = _compact_at_least(scores, columns, p, n - p, kth, kept)
            return kept, kth
        ties = rank  # many tied at the rank-th: the ones above it, then the first of the tied
        for p in range(n):
            ties -= scores[p] > kth
        kept = 0
        for p in range(n):
            x = scores[p]
            keep = (x > kth) | ((x == kth) & (ties > 0))
            ties -= x == kth
            scores[kept] = x
            columns[kept] = columns[p]
            kept += keep
        return kept, kth

    @_jit
    def _select_block(block, g0, n_gallery, k, estimate, threshold, scores, columns, fill, estimated, recent,
                      scratch):  # pragma: no cover - compiled
        """Merges a block (rows x C, C-contiguous) whose columns are gallery rows g0, g0 + 1, ... into each row's
        buffer (scores/columns: rows x (capacity + GROUP + LANES), scores above threshold[r] appended)."""
        width = block.shape[1]
        capacity = scores.shape[1] - GROUP - LANES
        full = width - width % GROUP
        for r in range(block.shape[0]):
            t = threshold[r]
            n = fill[r]
            row = block[r]
            buffer_scores, buffer_columns = scores[r], columns[r]
            if n == 0 and t == -np.inf:
                # nothing kept yet: the threshold from this block's best, instead of appending the whole block
                # and shrinking the buffer again and again
                rank = _rank(k, width, n_gallery, estimate)
                finite = np.nextafter(np.float32(-np.inf), np.float32(0))
                if 2 * rank <= GROUPS and width >= 4 * GROUPS:
                    # a bound: `rank` of the group maxima reach their rank-th largest, so `rank` scores do
                    _group_maxima(row, width, scratch)
                    if _count_at_least(scratch, GROUPS, finite) >= rank:
                        kth = _kth_best(scratch, GROUPS, rank, np.float32(-np.inf), np.float32(np.inf),
                                        scratch[GROUPS:])
                        t = np.nextafter(kth, np.float32(-np.inf))  # the scores >= kth are appended
                        estimated[r] |= rank < k
                elif _count_at_least(row, width, finite) >= rank:
                    kth = _kth_best(row, width, rank, np.float32(-np.inf), np.float32(np.inf), scratch)
                    t = np.nextafter(kth, np.float32(-np.inf))
                    estimated[r] |= rank < k
            # a row that took many scores from its last block appends without testing groups first: the
            # test's branch would go either way at random, and a mispredicted branch costs more than appending
            dense = recent[r] * DENSE > width
            appended = 0
            for j in range(0, full, GROUP):
                if not dense and not _any_above(row, j, t):
                    continue
                if n > capacity:
                    rank = _rank(k, g0 + j, n_gallery, estimate)
                    n, t = _shrink(buffer_scores, buffer_columns, n, rank, t, False, scratch)
                    estimated[r] |= rank < k
                before = n
                for lane in range(0, GROUP, LANES):
                    n = _append_above(row, j + lane, t, buffer_scores, buffer_columns, n, g0)
                appended += n - before
            recent[r] = appended
            for j in range(full, width):
                x = row[j]
                if x > t:
                    if n == capacity + GROUP:
                        rank = _rank(k, g0 + j, n_gallery, estimate)
                        n, t = _shrink(buffer_scores, buffer_columns, n, rank, t, False, scratch)
                        estimated[r] |= rank < k
                    if x > t:
                        buffer_scores[n] = x
                        buffer_columns[n] = g0 + j
                        n += 1
            threshold[r] = t
            fill[r] = n


    @_jit
    def _finish_keys(scores, columns, fill, threshold, k, keys, scratch):  # pragma: no cover - compiled
        """Each row's k best (the first of several tied at the k-th place) as sort keys (rows x k uint64):
        the score's order, best first, in the high 32 bits, the gallery row in the low ones, so that sorted
        keys are best first and equal scores by gallery row. A row with fewer than k gets keys that sort last
        (NO_KEY)."""
        for r in range(scores.shape[0]):
            n = fill[r]
            if n > k:
                n, _ = _shrink(scores[r], columns[r], n, k, threshold[r], True, scratch)
            for p in range(n):
                keys[r, p] = (np.uint64(~_ascending_key(scores[r, p])) << np.uint64(32)) | np.uint64(columns[r, p])
            for p in range(n, k):
                keys[r, p] = NO_KEY

    @_jit
    def _decode_keys(keys, out_scores, out_columns):  # pragma: no cover - compiled
        """Sorted keys of _finish_keys back to (score, gallery row), -inf and -1 for NO_KEY (no branch: the
        loop vectorises)."""
        for r in range(keys.shape[0]):
            row_keys, row_scores, row_columns = keys[r], out_scores[r].view(np.uint32), out_columns[r]
            for p in range(np.uint64(keys.shape[1])):
                key = row_keys[p]
                order = ~np.uint32(key >> np.uint64(32))  # NO_KEY: 0, the order key of the NaN 0xFFFFFFFF
                bits = order ^ np.uint32(0x80000000) if order >= np.uint32(0x80000000) else ~order
                missing = key == NO_KEY
                row_scores[p] = np.uint32(0xFF800000) if missing else bits  # -inf
                row_columns[p] = -1 if missing else np.int64(key & np.uint64(0xFFFFFFFF))


NO_KEY = np.uint64(2**64 - 1)  # sorts after every key of a score (the high half of those is never all ones: NaN)


def capacity(k: int) -> int:
    """Candidates a row's buffer holds before a selection shrinks it back to about k."""
    return 2 * k + GROUP


def fused_topk(queries, gallery, k, exclude, query_chunk, gallery_chunk, product, mask, select=True, estimate=True):
    """(scores Q x k float32, gallery rows Q x k int64) tensors, best first, equal scores by gallery row, -inf and
    -1 where a query has fewer than k gallery rows it may retrieve. queries, gallery: float32 CPU tensors;
    product(q, g) -> q @ g.T; mask(block, exclude_rows, g0) sets excluded scores to -inf.
    select=False runs the block products alone (benchmarks/bench_topk.py's `products` side); estimate=False
    never raises a threshold above the k-th best seen (tests)."""
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    threads = max(1, torch.get_num_threads())
    rows = max(1, -(-query_chunk // threads))
    # torch's allocation, not numpy's: numpy asks for huge pages, whose first touch is several times slower
    # on the project's VM, and the result is written once
    best_scores, best_columns = torch.empty((n_queries, k)), torch.empty((n_queries, k), dtype=torch.long)
    out_scores, out_columns = best_scores.numpy(), best_columns.numpy()

    workspaces = {}  # per thread: buffers reused by its tasks, dropped with the call

    def search(q, excluded, estimate, scores_into, columns_into):
        workspace = workspaces.setdefault(threading.get_ident(), {})
        selection = _Selection(q.shape[0], k, n_gallery, estimate, workspace) if select else None
        for g0 in range(0, n_gallery, gallery_chunk):
            block = product(q, gallery[g0 : g0 + gallery_chunk])
            if select:
                if excluded is not None:
                    mask(block, excluded, g0)
                selection.add(block.contiguous().numpy(), g0)
        # the rows whose threshold was an estimate and ended with fewer than k candidates above it
        return selection.finish(scores_into, columns_into) if select else np.zeros(0, dtype=np.int64)

    def task(q0):
        q = queries[q0 : q0 + rows].contiguous()
        excluded = None if exclude is None else exclude[q0 : q0 + rows]
        again = search(q, excluded, estimate, out_scores[q0 : q0 + rows], out_columns[q0 : q0 + rows])
        if len(again):  # searched again, every threshold the k-th best seen
            which = torch.from_numpy(again)
            scores, columns = np.empty((len(again), k), np.float32), np.empty((len(again), k), np.int64)
            search(q[which].contiguous(), None if excluded is None else excluded[which], False, scores, columns)
            out_scores[q0 + again], out_columns[q0 + again] = scores, columns

    starts = range(0, n_queries, rows)
    if len(starts) == 1 or threads == 1:
        for q0 in starts:
            task(q0)
    else:
        for future in [_pool(threads).submit(task, q0) for q0 in starts]:
            future.result()
    return best_scores, best_columns


def _buffer(workspace: dict, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array of `workspace` (one per thread and fused_topk call) reused from task to task, a fresh one being
    first touched again each time: at least `shape`'s elements, viewed as `shape`. torch allocates it, as the
    result."""
    size = math.prod(shape)
    held = workspace.get(name)
    if held is None or held.size < size:
        held = workspace[name] = torch.empty(size, dtype=_TORCH_TYPES[np.dtype(dtype)]).numpy()
    return held[:size].reshape(shape)


_TORCH_TYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int32): torch.int32, np.dtype(np.uint64): torch.uint64}


class _Selection:
    """The running top-k of one thread's query rows over the blocks of a gallery."""

    def __init__(self, rows: int, k: int, n_gallery: int, estimate: bool, workspace: dict):
        self.k, self.n_gallery, self.estimate, self.workspace = k, n_gallery, estimate, workspace
        # room for a group of appends beyond the capacity, and for whole-vector reads and stores beyond that
        width = capacity(k) + GROUP + LANES
        self.scores = _buffer(workspace, "scores", (rows, width), np.float32)
        self.columns = _buffer(workspace, "columns", (rows, width), np.int32)
        self.fill = np.zeros(rows, dtype=np.int64)
        self.threshold = np.full(rows, -np.inf, dtype=np.float32)
        self.estimated = np.zeros(rows, dtype=np.bool_)
        self.recent = np.zeros(rows, dtype=np.int64)  # scores each row took from the last block
        self.scratch = _buffer(workspace, "scratch", (max(width, 2 * GROUPS + LANES),), np.float32)

    def add(self, block: np.ndarray, g0: int) -> None:
        if self.scratch.shape[0] < block.shape[1] + LANES:
            self.scratch = _buffer(self.workspace, "scratch", (block.shape[1] + LANES,), np.float32)
        _select_block(block, g0, self.n_gallery, self.k, self.estimate, self.threshold, self.scores, self.columns,
                      self.fill, self.estimated, self.recent, self.scratch)

    def finish(self, out_scores: np.ndarray, out_columns: np.ndarray) -> np.ndarray:
        """Writes each row's k best, best first; returns the rows to search again (an estimate failed)."""
        again = np.flatnonzero(self.estimated & (self.fill < self.k))
        keys = _buffer(self.workspace, "keys", (self.scores.shape[0], self.k), np.uint64)
        _finish_keys(self.scores, self.columns, self.fill, self.threshold, self.k, keys, self.scratch)
        keys.sort(axis=1)  # numpy's sort: AVX-512 (x86-simd-sort) where the CPU has it
        _decode_keys(keys, out_scores, out_columns)
        return again


def _pool(threads: int) -> ThreadPoolExecutor:
    """Worker threads that each run torch (oneDNN) on one core: torch.set_num_threads is per thread under
    OpenMP, so the block products of T workers do not share, or wait on, one OpenMP team. One pool per process
    (a forked child does not inherit the threads)."""
    return _process_pool(threads, os.getpid())


@functools.cache
def _process_pool(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="topk", initializer=torch.set_num_threads, initargs=(1,))
