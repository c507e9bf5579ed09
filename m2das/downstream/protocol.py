"""The paper's Table V linear-evaluation protocol on frozen clip embeddings (numbers of the authors' tool).

Every fact of the protocol lives here: the optimiser and its numbers, the batch
rule, early stopping with ties counting as improvement, the metrics, the seeds
and the confidence interval of the mean over runs (how a task without a
validation split draws one is downstream.tasks' fact). NumPy and torch only.
"""

from dataclasses import dataclass

import numpy as np

LR = 3e-5                  # lr_lineareval of the tool's config for M2D models
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 1e-8        # the classifier's alpha
MAX_BATCH = 200            # batch = min(200, training clips)
MAX_EPOCHS = 200
PATIENCE = 20              # epochs without improvement before stopping; a tie is an improvement
SEEDS = (42, 43, 44)       # three runs on cached embeddings
CONFIDENCE = 0.95


@dataclass
class Settings:
    """One protocol; the defaults are Table V's."""
    lr: float = LR
    max_epochs: int = MAX_EPOCHS
    patience: int = PATIENCE
    max_batch: int = MAX_BATCH
    weight_decay: float = WEIGHT_DECAY
    seeds: tuple = SEEDS

    def batch_size(self, n_train: int) -> int:
        return max(1, min(self.max_batch, n_train))

    def describe(self) -> dict:
        return {"lr": self.lr, "betas": list(BETAS), "eps": ADAM_EPS, "weight_decay": self.weight_decay,
                "batch_size": f"min({self.max_batch}, n_train)", "max_epochs": self.max_epochs,
                "early_stop_epochs": self.patience, "tie_counts_as_improvement": True,
                "seeds": list(self.seeds), "standardised": "training split mean and std (ddof 0)",
                "classifier": "one linear layer, Adam"}


def standardise(fit_on: np.ndarray, *others: np.ndarray) -> list:
    """Scale every array with `fit_on`'s mean and population std; a constant feature keeps scale 1."""
    mean = fit_on.mean(0, dtype=np.float64)
    std = fit_on.std(0, dtype=np.float64)
    std[std < 10 * np.finfo(np.float64).eps] = 1.0
    return [((x - mean) / std).astype(np.float32) for x in (fit_on, *others)]


def average_precision_or_zero(scores: np.ndarray, positives: np.ndarray) -> float:
    from m2das.metrics import average_precision

    ap = average_precision(scores, positives)
    return 0.0 if np.isnan(ap) else ap


def macro_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over all classes; a class without a positive in the split scores 0, as in the tool."""
    return float(np.mean([average_precision_or_zero(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]))


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(scores, axis=1) == targets))


def score_of(scores: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    return macro_map(scores, targets) if multi_label else accuracy(scores, targets)


def _loss(logits, targets, multi_label: bool):
    """Softmax: the mean over all clip-class cells of -onehot * log_softmax (cross-entropy / classes, the
    tool's scale; Adam makes the scale matter only through eps and weight decay). Sigmoid: mean BCE."""
    import torch

    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, targets[:, None]).sum() / logits.numel()


@dataclass
class Fit:
    layer: object
    valid: float
    best_epoch: int
    epochs_run: int


def train_linear(x_train, y_train, x_valid, y_valid, n_classes: int, multi_label: bool, seed: int,
                 settings: Settings = Settings(), device="cpu") -> Fit:
    """One linear layer, Adam, early stopping on the validation score; the best weights restored.

    The best is updated when a score is >= the best so far (a tie moves the best epoch later
    and restarts the patience count); training stops after `patience` epochs without that.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x_train.shape[1], n_classes)
    bound = 1.0 / np.sqrt(x_train.shape[1])  # torch's default init, drawn from the seeded generator
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    layer.to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=settings.lr, betas=BETAS, eps=ADAM_EPS,
                           weight_decay=settings.weight_decay)
    xt, yt = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    xv = torch.from_numpy(x_valid).to(device)
    batch = settings.batch_size(len(xt))
    best, best_epoch, best_state, epoch = -np.inf, 0, None, 0
    for epoch in range(1, settings.max_epochs + 1):
        layer.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            idx = idx.to(device)
            opt.zero_grad()
            _loss(layer(xt[idx]), yt[idx], multi_label).backward()
            opt.step()
        with torch.no_grad():
            score = score_of(layer(xv).cpu().numpy(), y_valid, multi_label)
        if score >= best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    layer.load_state_dict(best_state)
    return Fit(layer.eval(), float(best), best_epoch, epoch)


# Two-sided Student t quantiles at 97.5% for 1..30 degrees of freedom (the 95% interval of a mean).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def confidence_interval(values) -> tuple:
    """(mean, half-width of the 95% interval of the mean: t(0.975, n-1) * sample std / sqrt(n)); 0 for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()), 0.0
    df = v.size - 1
    z = 1.959964  # beyond the table: the Cornish-Fisher expansion of t around the normal quantile
    t = _T975[df - 1] if df <= len(_T975) else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(v.size))


@dataclass
class Split:
    """Indices into the embedding rows of one fold.

    valid_drawn: the validation clips were drawn out of the training folds (ESC-50, US8K); the tool
    then fits its standardiser on all training folds (train + valid) and the layer on train only.
    """
    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    valid_drawn: bool = False


def run_fold(emb: np.ndarray, targets: np.ndarray, split: Split, n_classes: int, multi_label: bool, seed: int,
             settings: Settings, device="cpu") -> dict:
    """Standardise, train, score on test: one fold of one run."""
    import torch

    train, valid = split.train, split.valid
    stats_rows = np.concatenate([train, valid]) if split.valid_drawn else train
    _, x_train, x_valid, x_test = standardise(emb[stats_rows], emb[train], emb[valid], emb[split.test])
    fit = train_linear(x_train, targets[train], x_valid, targets[valid], n_classes, multi_label, seed, settings,
                       device)
    with torch.no_grad():
        scores = fit.layer(torch.from_numpy(x_test).to(device)).cpu().numpy()
    return {"fold": split.name, "seed": seed, "test": score_of(scores, targets[split.test], multi_label),
            "valid": fit.valid, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "counts": {"train": int(len(train)), "valid": int(len(valid)), "test": int(len(split.test))}}


def run_protocol(emb: np.ndarray, targets: np.ndarray, splits, n_classes: int, multi_label: bool,
                 settings: Settings = Settings(), device="cpu", log=None) -> dict:
    """Every seed over every fold; a run's score is its mean over folds; mean and 95% CI over runs.

    `splits`: a list of Split, or a function seed -> list (a task whose validation draw depends on it)."""
    folds, runs = [], []
    for seed in settings.seeds:
        scores = []
        for split in (splits(seed) if callable(splits) else splits):
            r = run_fold(emb, targets, split, n_classes, multi_label, seed, settings, device)
            folds.append(r)
            scores.append(r["test"])
            if log:
                log(f"seed {seed} fold {split.name}: test {r['test']:.4f} (best epoch {r['best_epoch']} "
                    f"of {r['epochs_run']})")
        runs.append(float(np.mean(scores)))
    mean, ci = confidence_interval(runs)
    return {"mean": mean, "ci95": ci, "runs": runs, "folds": folds,
            "metric": "mAP" if multi_label else "accuracy", "settings": settings.describe()}
