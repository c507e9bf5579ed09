"""Representation-quality numbers shared by `m2das eval` and the training monitor.

NumPy only, so their values can be checked by hand and nothing here touches a
random generator.
"""

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
