"""Choose a faiss index for the KB's image embeddings from (N, d, memory budget, recall target, k).

The rules follow faiss's wiki page "Guidelines to choose an index" and the index-selection logic
of autofaiss (read, not copied), adjusted by what was measured on this project's data:

* Flat is the only exact index; it is the choice when N is small enough that brute force is cheap.
* HNSW{M},Flat needs (4*d + 2*M*4) bytes per vector and no training; good below ~1M vectors.
* IVF{K} with K between 4*sqrt(N) and 16*sqrt(N); k-means needs 30*K..256*K training points.
  From about 1M vectors on, the coarse quantizer itself is an HNSW graph (IVF65536_HNSW32 ...).
* When memory is tight, vectors are compressed: SQ8 (d bytes/vector) and then PQ{m}
  (m bytes/vector). Bare PQ recalls poorly (measured: PQ64 0.31-0.61 at k=32), so PQ is always
  paired with re-ranking from fp16 copies of the vectors (`Refine(SQfp16)`), which the search
  side memory-maps from disk, so they cost disk, not RAM.

All vectors are L2-normalised, so the metric is inner product (= cosine).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from retformer.artifacts.errors import UserError

log = logging.getLogger(__name__)

METRIC = "inner_product"

# --- thresholds, each with where it comes from -------------------------------------------------

# Flat (exact) up to this many vectors. Wiki: Flat is "the only index that guarantees exact
# results" and the baseline for small sets; at 1e5 x 512 one query costs 5e7 multiply-adds, a few
# ms, and the neighbor stage then has no recall loss at all. (autofaiss uses 1e3 because it
# optimises latency; our queries are an offline batch job.)
FLAT_MAX_N = 100_000
# HNSW below this many vectors. Wiki: HNSW is the best speed/accuracy when memory allows, in the
# "below 1M vectors" bucket; measured on this project's data, HNSW built 3-8x slower than IVF at 1M and
# recalling less, so from 1M on we use IVF.
HNSW_MAX_N = 1_000_000
# Wiki: M between 4 and 64, memory (4*d + 2*M*4) bytes/vector; 32 is the wiki's and autofaiss's
# default upper choice.
HNSW_M = 32
# faiss's default efConstruction (wiki: 40); raising it buys graph quality for build time.
HNSW_EF_CONSTRUCTION = 40
# Wiki: K = 4*sqrt(N) .. 16*sqrt(N) centroids; we take the first power of two above the low end
# (autofaiss starts near there too): the cheapest k-means, and the nprobe sweep recovers recall.
IVF_CENTROIDS_PER_SQRT_N = 4
IVF_MAX_NLIST = 1 << 20  # wiki's largest recommendation (IVF1048576_HNSW32 for ~1B vectors)
# Wiki: from 1M vectors on, the coarse quantizer is itself an HNSW (IVF65536_HNSW32, ...):
# a flat scan of 65k+ centroids per query would dominate the search.
IVF_HNSW_QUANTIZER_MIN_NLIST = 65_536
IVF_HNSW_QUANTIZER_M = 32
# Wiki: "you will need between 30*K and 256*K vectors for training (the more the better)".
TRAIN_MIN_POINTS_PER_CENTROID = 30
TRAIN_MAX_POINTS_PER_CENTROID = 256
TRAIN_POINTS_PER_CENTROID = 64  # our default inside that range (autofaiss uses 100 when RAM allows)
# PQ trains 256 centroids per sub-quantizer; faiss's k-means warns below 39 points per centroid.
PQ_MIN_TRAIN_POINTS = 39 * 256
# The training sample (fp32) may use at most this fraction of the memory budget.
TRAIN_MEMORY_FRACTION = 0.5
# Unquantised IVF (IVF,Flat) below this N when it fits (autofaiss's ivf_flat_threshold).
IVF_FLAT_MAX_N = 1_000_000
# SQ8 caps recall a little below exact storage: IVF4096,SQ8 measured 0.98 (k=32,
# d=512). Targets above this need unquantised (or re-ranked) vectors.
SQ8_RECALL_CEILING = 0.98
# PQ code sizes to try, largest (most accurate) first; m must divide d. 64 bytes is the
# web-scale figure (1.4B x 64 B ~ 100 GB).
PQ_M_CHOICES = (128, 96, 64, 48, 32, 16, 8)
# At least 4 dimensions per sub-quantizer (wiki: OPQ{M}_{D} with D = 4*M; finer splits train
# slowly and gain little).
PQ_MIN_DIMS_PER_SUBQUANTIZER = 4
# The index may use at most this fraction of the budget: the rest is query batches, result heaps,
# the process itself.
MEMORY_HEADROOM = 0.8
ID_BYTES = 8  # faiss stores one int64 id per vector (inverted lists or IndexIDMap)

# --- search-time sweeps (cheap -> expensive) ---------------------------------------------------
EF_SEARCH_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
REFINE_K_FACTORS = (2, 8, 32)  # candidates re-ranked = k * k_factor

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq_refine", "ivf_pq")


@dataclass
class IndexPlan:
    """What to build and how to search it. JSON-able (asdict) and picklable (Dask)."""

    kind: str  # one of KINDS
    factory: str  # faiss.index_factory string; ids are kb_ids (IDMap or IVF add_with_ids)
    n: int
    d: int
    metric: str = METRIC
    train_size: int = 0  # 0 = no training needed
    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    build_params: dict[str, Any] = field(default_factory=dict)
    search_sweep: list[dict[str, Any]] = field(default_factory=list)  # cheap -> expensive
    estimated_bytes: int = 0  # RAM the index needs at search time
    estimated_disk_bytes: int = 0  # bytes of the index files
    reason: str = ""
    seed: int = 0
    considered: list[dict[str, Any]] = field(default_factory=list)

    @property
    def needs_training(self) -> bool:
        return self.train_size > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(obj: dict[str, Any]) -> IndexPlan:
        return IndexPlan(**obj)


def ivf_nlist(n: int) -> int:
    """Smallest power of two >= 4*sqrt(n) (so within the wiki's 4..16*sqrt(n)), halved until the
    n vectors give at least 30 training points per centroid."""
    target = IVF_CENTROIDS_PER_SQRT_N * math.sqrt(max(n, 1))
    nlist = 1 << max(0, math.ceil(math.log2(max(target, 1.0))))
    nlist = min(nlist, IVF_MAX_NLIST)
    while nlist > 1 and nlist * TRAIN_MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def _quantizer_suffix(nlist: int) -> str:
    return f"_HNSW{IVF_HNSW_QUANTIZER_M}" if nlist >= IVF_HNSW_QUANTIZER_MIN_NLIST else ""


def estimate_bytes(
    kind: str, n: int, d: int, *, nlist: int = 0, pq_m: int = 0, hnsw_m: int = HNSW_M
) -> tuple[int, int]:
    """(RAM bytes at search time, bytes on disk) of an index, from the per-vector code sizes.

    Flat: 4d + id; HNSW: 4d + 2*M*4 (level-0 links, wiki) + ~16 (levels, offsets) + id;
    IVF: code + id per vector plus 4d per centroid; PQ adds 256 x 4d of codebooks; Refine(SQfp16)
    adds 2d per vector on disk (memory-mapped at search) and an IndexIDMap id per vector.
    """
    centroids = nlist * 4 * d
    if nlist >= IVF_HNSW_QUANTIZER_MIN_NLIST:
        centroids += nlist * 2 * IVF_HNSW_QUANTIZER_M * 4
    if kind == "flat":
        ram = n * (4 * d + ID_BYTES)
        return ram, ram
    if kind == "hnsw":
        ram = n * (4 * d + 2 * hnsw_m * 4 + 16 + ID_BYTES)
        return ram, ram
    if kind == "ivf_flat":
        ram = n * (4 * d + ID_BYTES) + centroids
        return ram, ram
    if kind == "ivf_sq8":
        ram = n * (d + ID_BYTES) + centroids + 2 * 4 * d
        return ram, ram
    if kind in ("ivf_pq", "ivf_pq_refine"):
        ram = n * (pq_m + ID_BYTES) + centroids + 256 * 4 * d
        if kind == "ivf_pq":
            return ram, ram
        ram += n * ID_BYTES  # IndexIDMap around IndexRefine (IndexRefine has no add_with_ids)
        return ram, ram + n * 2 * d
    raise ValueError(f"unknown index kind {kind!r} (expected one of {KINDS})")


def _train_size(kind: str, n: int, d: int, nlist: int, budget: int | None) -> int:
    if not kind.startswith("ivf"):
        return 0
    size = TRAIN_POINTS_PER_CENTROID * nlist
    if kind in ("ivf_pq", "ivf_pq_refine"):
        size = max(size, PQ_MIN_TRAIN_POINTS)
    if budget:
        size = min(size, int(TRAIN_MEMORY_FRACTION * budget) // (4 * d))
    size = max(size, TRAIN_MIN_POINTS_PER_CENTROID * nlist)
    size = min(size, TRAIN_MAX_POINTS_PER_CENTROID * max(nlist, PQ_MIN_TRAIN_POINTS // 256))
    return int(min(size, n))


def _nprobe_values(nlist: int) -> list[int]:
    values = [1 << i for i in range(int(math.log2(nlist)) + 1)]
    if values[-1] != nlist:
        values.append(nlist)
    return values


def default_sweep(kind: str, nlist: int = 0) -> list[dict[str, Any]]:
    """Search settings to try, cheapest first (efSearch for HNSW, nprobe [x k_factor] for IVF)."""
    if kind == "flat":
        return [{}]
    if kind == "hnsw":
        return [{"efSearch": e} for e in EF_SEARCH_SWEEP]
    sweep: list[dict[str, Any]] = []
    for nprobe in _nprobe_values(nlist):
        base: dict[str, Any] = {"nprobe": nprobe}
        if nlist >= IVF_HNSW_QUANTIZER_MIN_NLIST:
            base["quantizer_efSearch"] = max(2 * nprobe, 64)  # must exceed nprobe to find the lists
        if kind == "ivf_pq_refine":
            sweep.extend({**base, "k_factor": kf} for kf in REFINE_K_FACTORS)
        else:
            sweep.append(base)
    return sweep


def make_plan(
    kind: str,
    n: int,
    d: int,
    *,
    nlist: int | None = None,
    pq_m: int | None = None,
    hnsw_m: int = HNSW_M,
    memory_budget_bytes: int | None = None,
    reason: str = "",
    seed: int = 0,
) -> IndexPlan:
    """The plan of one index kind for (n, d): factory string, training size, sweep, sizes."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r} (expected one of {KINDS})")
    build_params: dict[str, Any] = {}
    nl = 0
    m = 0
    if kind == "flat":
        factory = "IDMap,Flat"
    elif kind == "hnsw":
        factory = f"IDMap,HNSW{hnsw_m},Flat"
        build_params["efConstruction"] = HNSW_EF_CONSTRUCTION
    else:
        nl = int(nlist or ivf_nlist(n))
        q = f"IVF{nl}{_quantizer_suffix(nl)}"
        if kind == "ivf_flat":
            factory = f"{q},Flat"
        elif kind == "ivf_sq8":
            factory = f"{q},SQ8"
        else:
            m = int(pq_m or _largest_pq_m(d))
            if d % m:
                raise ValueError(f"PQ{m} needs d divisible by {m} (d={d})")
            factory = f"{q},PQ{m}" if kind == "ivf_pq" else f"IDMap,{q},PQ{m},Refine(SQfp16)"
    ram, disk = estimate_bytes(kind, n, d, nlist=nl, pq_m=m, hnsw_m=hnsw_m)
    return IndexPlan(
        kind=kind,
        factory=factory,
        n=int(n),
        d=int(d),
        train_size=_train_size(kind, n, d, nl, memory_budget_bytes),
        nlist=nl,
        pq_m=m,
        hnsw_m=hnsw_m if kind == "hnsw" else 0,
        build_params=build_params,
        search_sweep=default_sweep(kind, nl),
        estimated_bytes=ram,
        estimated_disk_bytes=disk,
        reason=reason,
        seed=seed,
    )


def _pq_ok(m: int, d: int) -> bool:
    return d % m == 0 and d // m >= PQ_MIN_DIMS_PER_SUBQUANTIZER


def _largest_pq_m(d: int) -> int:
    for m in PQ_M_CHOICES:
        if _pq_ok(m, d):
            return m
    return max(1, d // PQ_MIN_DIMS_PER_SUBQUANTIZER) if d % PQ_MIN_DIMS_PER_SUBQUANTIZER == 0 else 1


def _gb(b: float) -> str:
    return f"{b / 1e12:.3g} TB" if b >= 1e12 else f"{b / 1e9:.3g} GB"


def choose_index(n: int, d: int, memory_budget_bytes: int, recall_target: float, k: int) -> IndexPlan:
    """Pick the index for n vectors of dimension d within a RAM budget, aiming at recall@k >= target.

    Candidates, most accurate first: Flat (n <= FLAT_MAX_N), HNSW32 (n < HNSW_MAX_N), IVF,Flat,
    IVF,SQ8 (target <= SQ8_RECALL_CEILING), IVF,PQ{m} + fp16 re-ranking (largest m that fits).
    The first candidate that fits `MEMORY_HEADROOM * budget` wins; `plan.reason` says why, and
    `plan.considered` lists every candidate with its size and verdict.
    """
    if n <= 0 or d <= 0:
        raise UserError(f"cannot index {n} vectors of dimension {d}: the KB is empty")
    if memory_budget_bytes <= 0:
        raise UserError(f"memory budget must be positive, got {memory_budget_bytes} bytes")
    if not 0.0 < recall_target <= 1.0:
        raise UserError(f"recall target must be in (0, 1], got {recall_target}")
    if k <= 0:
        raise UserError(f"k must be positive, got {k}")
    usable = int(MEMORY_HEADROOM * memory_budget_bytes)
    considered: list[dict[str, Any]] = []
    budget_txt = f"{_gb(usable)} usable of a {_gb(memory_budget_bytes)} budget"

    def consider(kind: str, why: str, **kw: Any) -> IndexPlan | None:
        plan = make_plan(kind, n, d, memory_budget_bytes=memory_budget_bytes, **kw)
        fits = plan.estimated_bytes <= usable
        considered.append({"factory": plan.factory, "bytes": plan.estimated_bytes, "fits": fits, "note": why})
        return plan if fits else None

    def done(plan: IndexPlan, reason: str) -> IndexPlan:
        plan.reason = (
            f"{plan.factory} for N={n:,}, d={d}, recall@{k} target {recall_target}: {reason} "
            f"(estimated {_gb(plan.estimated_bytes)} RAM, {budget_txt})."
        )
        plan.considered = considered
        log.info("index choice: %s", plan.reason)
        for c in considered:
            log.debug(
                "  considered %s: %s, fits=%s (%s)", c["factory"], _gb(c["bytes"]), c["fits"], c["note"]
            )
        return plan

    if recall_target >= 1.0:
        plan = consider("flat", "recall 1.0 needs exact search")
        if plan is None:
            raise UserError(
                f"recall target 1.0 needs exact search (Flat, {_gb(considered[-1]['bytes'])}), which "
                f"exceeds {budget_txt}: lower the recall target or raise the memory budget"
            )
        return done(plan, "a recall target of 1.0 can only be met by exact search")

    if n <= FLAT_MAX_N:
        plan = consider("flat", f"N <= FLAT_MAX_N={FLAT_MAX_N:,}")
        if plan:
            return done(
                plan, f"N <= {FLAT_MAX_N:,}, so exact brute-force search is cheap and loses no recall"
            )
    if n < HNSW_MAX_N:
        plan = consider("hnsw", f"N < HNSW_MAX_N={HNSW_MAX_N:,}")
        if plan:
            return done(
                plan,
                f"mid-size N (< {HNSW_MAX_N:,}) and the graph fits in RAM: HNSW needs no training "
                "and reaches high recall at small efSearch (faiss wiki)",
            )
    if n < IVF_FLAT_MAX_N or recall_target > SQ8_RECALL_CEILING:
        why = (
            f"N < IVF_FLAT_MAX_N={IVF_FLAT_MAX_N:,}"
            if n < IVF_FLAT_MAX_N
            else f"target {recall_target} > SQ8 ceiling {SQ8_RECALL_CEILING}"
        )
        plan = consider("ivf_flat", why)
        if plan:
            return done(
                plan,
                f"IVF with {plan.nlist} lists (~4*sqrt(N), faiss wiki) over unquantised vectors: "
                f"{why}, and it fits in RAM",
            )
    if recall_target <= SQ8_RECALL_CEILING:
        plan = consider("ivf_sq8", f"target <= SQ8 ceiling {SQ8_RECALL_CEILING}")
        if plan:
            why = (
                "unquantised vectors do not fit"
                if n < IVF_FLAT_MAX_N
                else f"from N >= {IVF_FLAT_MAX_N:,} on memory dominates"
            )
            return done(
                plan,
                f"{why}: IVF with {plan.nlist} lists and 8-bit scalar quantisation stores d bytes/vector "
                f"(4x less than fp32), and DESIGN.md measured 0.98 recall@32 with it, above the target",
            )
    for m in PQ_M_CHOICES:
        if not _pq_ok(m, d):
            continue
        plan = consider("ivf_pq_refine", f"PQ{m}: {m} bytes/vector + re-ranking from fp16 on disk", pq_m=m)
        if plan:
            return done(
                plan,
                f"memory is tight: IVF with {plan.nlist} lists and {m}-byte PQ codes is the most "
                f"accurate code that fits; bare PQ recalls poorly, so the top k*k_factor candidates "
                f"are re-ranked from fp16 copies of the vectors ({_gb(n * 2 * d)} on disk, "
                "memory-mapped at search)",
            )
    smallest = min(c["bytes"] for c in considered) if considered else 0
    raise UserError(
        f"no index for N={n:,} x d={d} fits {budget_txt} (smallest candidate needs {_gb(smallest)}): "
        "raise the memory budget or shard the KB over more machines"
    )
