"""Representation-quality numbers shared by `m2das eval` and the training monitor.

The NumPy functions are the reference: their values can be checked by hand.
The `torch_*` twins give the same numbers (up to float rounding) on whatever
device holds the tensors, in chunks, so the monitor needs no host copy of
20,000 x 3840 embeddings. Nothing here touches a random generator. Torch is
imported inside the twins: `m2das eval`'s NumPy path does not need it.
"""

import contextlib

import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (no interpolation).

    Tied scores form one threshold, so the value does not depend on the order of
    equal scores. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(positives)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, true_pos]) / n_pos
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes that have at least one positive (AudioSet's mAP)."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def rankme(embeddings: np.ndarray, eps: float = 1e-7) -> float:
    """Effective rank of an [N, D] embedding matrix (Garrido et al., ICML 2023).

    exp of the entropy of the singular values normalised to sum 1 (each plus
    eps). Singular values come from the smaller Gram matrix, so 20,000 clips of
    3840-d cost a 3840 x 3840 eigen-decomposition.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    sigma = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
    p = sigma / max(sigma.sum(), np.finfo(np.float64).tiny) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def knn_accuracy(embeddings: np.ndarray, targets: np.ndarray, k: int = 10, block: int = 2048) -> float:
    """Leave-one-out k-nearest-neighbour accuracy with cosine similarity.

    Each clip's neighbours vote with their label vectors; the prediction is the
    class with most votes (ties to the lowest index), correct when the clip has
    that label. Works for single- and multi-label targets alike.
    """
    z = np.asarray(embeddings, dtype=np.float32)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    targets = np.asarray(targets, dtype=np.float32)
    n = z.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    correct = 0
    for start in range(0, n, block):
        sim = z[start:start + block] @ z.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # leave the clip itself out
        neighbours = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = targets[neighbours].sum(axis=1)
        predicted = votes.argmax(axis=1)
        correct += int((targets[start + rows, predicted] > 0).sum())
    return correct / n


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, C] scores against integer labels [N]."""
    return float(np.mean(np.asarray(scores).argmax(axis=1) == np.asarray(labels)))


# -- the same numbers on a torch device --------------------------------------------------------------


@contextlib.contextmanager
def full_float32():
    """TF32 off for matmuls on CUDA: the trainer turns it on, and its 10-bit mantissa would
    change which neighbours are nearest and values that should match the float32 ones."""
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def torch_knn_hits(embeddings, targets, k: int = 10, rows=None, block: int = 2048):
    """Correct leave-one-out kNN predictions (`knn_accuracy`'s rule) among query `rows`
    (default: all), as a 0-d int64 tensor on the embeddings' device.

    Every clip is a candidate neighbour; only the queries are split, so ranks that each
    hold all embeddings can share the work by rows and add their counts.
    """
    import torch

    with full_float32():
        z = embeddings.float()
        z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        targets = targets.to(z.device, torch.float32)
        rows = torch.arange(z.shape[0], device=z.device) if rows is None else rows.to(z.device)
        k = min(k, z.shape[0] - 1)
        hits = torch.zeros((), dtype=torch.int64, device=z.device)
        if k < 1:
            return hits
        for start in range(0, rows.numel(), block):
            query = rows[start:start + block]
            sim = z[query] @ z.T
            sim[torch.arange(query.numel(), device=z.device), query] = -torch.inf  # leave the clip itself out
            neighbours = sim.topk(k, dim=1, sorted=False).indices
            predicted = targets[neighbours].sum(dim=1).argmax(dim=1)  # ties to the lowest index, as NumPy's
            hits += (targets[query, predicted] > 0).sum()
        return hits


def torch_knn_accuracy(embeddings, targets, k: int = 10, block: int = 2048) -> float:
    """`knn_accuracy` on a torch device."""
    n = embeddings.shape[0]
    if min(k, n - 1) < 1:
        return float("nan")
    return int(torch_knn_hits(embeddings, targets, k, block=block)) / n


def torch_rankme(embeddings, eps: float = 1e-7) -> float:
    """`rankme` on a torch device, in float64 like the reference."""
    import torch

    z = embeddings.double()
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = sigma / sigma.sum().clamp_min(np.finfo(np.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def torch_mean_average_precision(scores, targets, classes_per_chunk: int = 128) -> float:
    """`mean_average_precision` on a torch device, the classes of a chunk sorted at once.

    Each positive contributes the precision at the last row of its tie group (rows
    with equal scores form one threshold), which is `average_precision`'s sum.
    Classes are rows here ([C, N], contiguous): sorting along the last dimension
    is several times faster than down strided columns on a CPU.
    """
    import torch

    scores_t, positives_t = scores.T, targets.to(scores.device).T > 0
    present = positives_t.any(dim=1).nonzero().squeeze(1)
    n = scores.shape[0]
    position = torch.arange(n, device=scores.device)
    aps = []
    for c in range(0, present.numel(), classes_per_chunk):
        chosen = present[c:c + classes_per_chunk]
        ordered, order = scores_t[chosen].sort(dim=1, descending=True)  # ties: any order, one threshold
        hit = positives_t[chosen].gather(1, order).double()
        group_end = torch.ones_like(ordered, dtype=torch.bool)
        group_end[:, :-1] = ordered[:, 1:] != ordered[:, :-1]
        last = torch.where(group_end, position, n).flip(1).cummin(dim=1).values.flip(1)
        precision = hit.cumsum(dim=1).gather(1, last) / (last + 1)
        aps.append((hit * precision).sum(dim=1) / hit.sum(dim=1))
    return float(torch.cat(aps).mean()) if aps else float("nan")
