"""Feature mode's `Feed`: shuffled mini-batches of the in-memory retrieval features, mixup on the
embeddings."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from retformer.trainer import distributed
from retformer.trainer.config import TrainConfig
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.feed import Feed, Micro
from retformer.trainer.loss import mixed, soft_targets
from retformer.trainer.runtime import intra_op_threads

# A one-process fit whose inputs (and their mixup partners) take at most this many bytes for a whole
# epoch gathers and mixes them once per epoch (`feature_feed`): the baselines' 1,236 x 1,280 floats.
EPOCH_INPUT_BYTES = 64 << 20


def feature_feed(
    train: RetrievalFeatures, config: TrainConfig, device: torch.device, use_nn: bool, num_classes: int
) -> Feed:
    """Shuffled mini-batches of the in-memory features; mixup on the embeddings. Every rank draws the
    order and the mixup of each global batch, then gathers its part and its part's mixup partners.

    The inputs a model reads (z, and nn_img / nn_txt when it reads the neighbours) are gathered, and
    mixed in place (`mixed`: the loop's arithmetic, bit for bit), into two
    buffers per input that every step reuses: a fresh (B, k, D) float32 tensor per step and per
    operation cost more than the arithmetic (page faults on every new large allocation). The
    neighbours come from the split's resident tensors when it has them (`fit`). The soft targets are
    made once per split and mixed here too (`Micro.targets`). A yielded part's tensors are
    overwritten by the next part: the loop is done with a part when it asks for the next."""
    # The whole-epoch gather and mix are memory-bound copies of (N, D): they run on the threads the
    # process has (2x faster on 2 cores than on the one thread a small model's steps use).
    copy_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(config.seed)  # shuffling and mixup permutations
    np_rng = np.random.default_rng(config.seed)  # mixup lambda
    n, bs = len(train), config.batch_size
    sources = {"x": "z", "nn_img": "nn_img", "nn_txt": "nn_txt"} if use_nn else {"x": "z"}
    widths = {"z": (train.img_dim,), "nn_img": (train.k, train.img_dim), "nn_txt": (train.k, train.txt_dim)}
    buffers: dict[tuple[str, int], torch.Tensor] = {}
    soft = soft_targets(train.labels, num_classes, config.label_smoothing)  # per row: the loop's values

    def gathered(key: str, which: int, idx: torch.Tensor) -> torch.Tensor:
        buf = buffers.get((key, which))
        if buf is None:
            rows = n if whole_epoch else bs  # a whole epoch's rows, or a batch's
            buf = torch.empty((rows, *widths[sources[key]]), dtype=torch.float32, device=train.device)
            buffers[(key, which)] = buf
        return train.gather_into(sources[key], idx, buf[: len(idx)])

    single = distributed.world() == 1
    row_bytes = 4 * sum(math.prod(widths[src]) for src in sources.values())
    whole_epoch = single and 2 * n * row_bytes <= EPOCH_INPUT_BYTES

    def draws(idxs: list[torch.Tensor]) -> list[tuple[float | None, torch.Tensor | None]]:
        """Each batch's mixup (lambda, partner permutation), drawn in the per-batch order."""
        out: list[tuple[float | None, torch.Tensor | None]] = []
        for idx in idxs:
            if config.mixup_alpha > 0:  # drawn for the global batch, on every rank alike
                lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                out.append((lam, torch.randperm(len(idx), generator=gen)))
            else:
                out.append((None, None))
        return out

    def epoch_items(perm: torch.Tensor, idxs: list[torch.Tensor]) -> Iterable[Micro]:
        """One process, small inputs: the whole epoch's batches gathered and mixed at once (a few ops
        on (N, D) instead of a dozen per step), then sliced. Per row the same products and sums as
        the per-batch path: lam and 1 - lam are each batch's float32 scalars, repeated per row."""
        mixes = draws(idxs)
        with intra_op_threads(copy_threads):
            b, targets = epoch_inputs(perm, idxs, mixes)
        start = 0
        for idx in idxs:
            stop = start + len(idx)
            yield Micro({k: v[start:stop] for k, v in b.items()}, None, len(idx), targets=targets[start:stop])
            start = stop

    def epoch_inputs(
        perm: torch.Tensor, idxs: list[torch.Tensor], mixes: list[tuple[float | None, torch.Tensor | None]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The epoch's gathered and mixed inputs (and labels) and mixed soft targets, in `perm`'s order."""
        own = perm.to(train.device)
        b = {key: gathered(key, 0, own) for key in sources}
        targets = soft[own]
        if config.mixup_alpha > 0:
            partner = torch.cat([idx[p] for idx, (_, p) in zip(idxs, mixes, strict=True)]).to(train.device)
            sizes = torch.tensor([len(idx) for idx in idxs])

            def per_row(values: list[float]) -> torch.Tensor:  # (N,) float32, one value per batch
                return torch.tensor(values, dtype=torch.float32).repeat_interleave(sizes).to(train.device)

            lam = per_row([m[0] for m in mixes])
            for key, src in sources.items():
                shape = (n, *[1] * len(widths[src]))
                b[key] = mixed(b[key], gathered(key, 1, partner), lam.view(shape))
            targets = mixed(targets, soft[partner], lam[:, None])
        b["y"] = train.labels[own]
        if use_nn:
            b["nn_label"] = train.store_label[train.nn_rows[own]]
        return {k: v.to(device) for k, v in b.items()}, targets.to(device)

    def batches(epoch: int) -> tuple[list[int], Iterable[Micro]]:
        perm = torch.randperm(n, generator=gen)
        idxs = [perm[s : s + bs] for s in range(0, n, bs)]
        if whole_epoch:
            return [len(i) for i in idxs], epoch_items(perm, idxs)

        def items() -> Iterable[Micro]:
            for idx in idxs:
                lam = p = None
                if config.mixup_alpha > 0:  # drawn for the global batch, on every rank alike
                    lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                    p = torch.randperm(len(idx), generator=gen)
                needed, m, partner_at, counted = distributed.micro_shard(len(idx), p)
                rows = (idx if single else idx[torch.from_numpy(needed)]).to(train.device)
                own = rows[:m]
                b = {key: gathered(key, 0, own) for key in sources}
                b["y"] = train.labels[own]
                if use_nn:
                    b["nn_label"] = train.store_label[train.nn_rows[own]]
                targets = soft[own]
                mix = None
                if partner_at is not None and lam is not None:
                    partner = rows[torch.as_tensor(partner_at, device=rows.device)]
                    for key in sources:
                        b[key] = mixed(b[key], gathered(key, 1, partner), lam)
                    targets = mixed(targets, soft[partner], lam)
                    mix = (lam, {"y": train.labels[partner]})
                # Reused buffers: a blocking copy when the device differs (no copy is left in flight).
                b = {k: v.to(device) for k, v in b.items()}
                yield Micro(b, mix, counted, targets=targets.to(device))

        return [len(i) for i in idxs], items()

    return Feed(batches, gen=gen, np_rng=np_rng)
