"""Learned deep hashing: a small neural head on frozen features, trained with torch, encoded in numpy.

The network (``h = (x - mean_)``, standardisation folded into the weights)::

    z = h @ projection_ + relu(h @ hidden_weight_ + hidden_bias_) @ output_weight_ + output_bias_
    bit i = z_i > 0

a linear path plus a one-hidden-layer MLP residual. The linear path keeps the base-class
layout (``mean_`` (d,), ``projection_`` (d, n_bits)) that :func:`hasher_from_bytes` checks,
and on its own is a linear hasher, so the MLP only has to learn a correction. Training uses
``tanh(z)`` as a relaxed code; encoding takes the sign.

Why two processes agree bit for bit: ``fit`` needs torch (imported inside ``fit`` only), but
``encode`` is pure numpy in float64 from the weights stored (as float64) by ``to_bytes``, the
same rule as every other hasher here; torch is neither needed nor consulted to encode.

Objectives (chosen by ``y`` in ``fit``):

* Supervised (labels given): hash centres, as in Central Similarity Quantization (Yuan et al.,
  CVPR 2020). Each class gets a +-1 target code (Hadamard rows, pairwise ``n_bits / 2``
  apart), the relaxed code is pulled toward its class centre by binary cross-entropy per bit,
  plus a quantisation penalty ``(|tanh z| - 1)^2``. Unlabelled rows (``None`` / NaN labels)
  take no part in that loss; when there are some, the unsupervised neighbour loss below is
  added over all rows so they still shape the codes. The centre loss drives the training loss
  toward zero long before the codes stop improving (the validation loss turns up after a few
  epochs while held-out retrieval still gains), so supervised training runs a fixed
  ``supervised_epochs`` with cosine learning-rate decay, keeps the last weights, applies dropout
  to the hidden layer only (dropping input features costs ~0.05 P@10 on CIFAR-10), and uses a
  small quantisation weight (CSQ's lambda, ``centre_quantization_weight``).
* Unsupervised (``y`` None or all unlabelled): neighbours in feature space stay close in
  Hamming space. Each row's ``n_neighbors`` nearest rows by cosine on the float features are
  its positives; an InfoNCE loss over a batch pulls a row's relaxed code toward one of its
  neighbours' and away from the other rows' codes, plus quantisation and a bit-balance term
  (each bit's batch mean toward 0, so every bit splits the data). The linear path starts from
  the ITQ solution (PCA + rotation), so training begins at ITQ's codes and moves away only where
  the neighbour loss improves.

Early stopping (unsupervised): ``validation_fraction`` of the rows (a fixed random subset) is
held out, the loss on it is measured after every epoch, and the weights of the best epoch are
kept. Supervised training does not stop on it: with every row labelled it trains on all rows
(the reported validation loss is then a diagnostic on training rows); with some unlabelled it
holds out the same rows and reports their loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

from imgstore.errors import DimensionMismatchError, HasherError, NotEnoughDataError
from imgstore.hashing.base import Hasher, check_array, register
from imgstore.hashing.methods import DEFAULT_MAX_SAMPLES, ITQHasher, _class_centres

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
#: ``progress(epoch, train_loss)``: called after each epoch (1-based) with the mean training loss.
ProgressCallback = Callable[[int, float], None]

#: A feature whose standard deviation is below this (relative to the largest) is treated as
#: constant: it is centred but not scaled up, so noise in a dead unit is not amplified.
_RELATIVE_STD_FLOOR = 1e-6
#: Rows per block when searching the k nearest neighbours (memory: block * n * 4 bytes).
_KNN_BLOCK_ROWS = 1024


def _unlabelled(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _label_indices(y: npt.ArrayLike, n_rows: int) -> tuple[npt.NDArray[np.int64], int]:
    """Map labels (any hashable; None / NaN = unlabelled) to ``(n_rows,)`` class indices, -1 for
    unlabelled, and the number of classes. Classes are numbered in sorted order when the labels
    sort, else in order of first appearance, so the same ``y`` always gives the same numbering."""
    arr = np.asarray(y, dtype=object)
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise DimensionMismatchError(
            f"y must hold one label per row of X: got {arr.shape} labels for {n_rows} rows"
        )
    values = [v.item() if isinstance(v, np.generic) else v for v in arr.tolist()]
    seen = list(dict.fromkeys(v for v in values if not _unlabelled(v)))
    with contextlib.suppress(TypeError):  # labels of mixed types keep their first-seen order
        seen = sorted(seen)
    index = {v: i for i, v in enumerate(seen)}
    return np.array([-1 if _unlabelled(v) else index[v] for v in values], dtype=np.int64), len(seen)


def _knn(
    queries: npt.NDArray[np.float32], base: npt.NDArray[np.float32], k: int, exclude_self: bool
) -> npt.NDArray[np.int64]:
    """Indices ``(n_queries, k)`` of the ``k`` most cosine-similar rows of ``base`` (rows of
    both already L2-normalised), most similar first; with ``exclude_self`` row ``i`` of
    ``queries`` is row ``i`` of ``base`` and is skipped. Ties break by index (stable sort)."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], _KNN_BLOCK_ROWS):
        sim = queries[start : start + _KNN_BLOCK_ROWS] @ base.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, start + rows] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
        out[start : start + sim.shape[0]] = np.take_along_axis(part, order, axis=1)
    return out


def _l2_normalise(X: F64) -> npt.NDArray[np.float32]:
    norms: F64 = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_positive(name: str, value: object, *, integer: bool, allow_zero: bool = False) -> None:
    v: float | None = None  # the value when it is a number of the right kind (never a bool)
    if (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
        not integer and isinstance(value, (float, np.floating))
    ):
        v = float(value)
    ok = v is not None and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        what = "int" if integer else "number"
        raise HasherError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {what}, got {value!r}")


@register
class DeepHasher(Hasher):
    """Learned hash function: a two-layer head on frozen features (see the module docstring).

    Supervised with labels (``fit(X, y)``: hash centres), unsupervised without (neighbour
    contrastive loss, started from ITQ). Training needs torch and runs on the CPU; encoding is
    numpy only.

    hidden_units: width of the hidden layer; None: 512 with labels (a 256-wide head tops out near
      0.80 mAP on CIFAR-10 at 64 bits, 512 reaches ~0.82), 256 without.
    max_epochs, patience: unsupervised training stops after ``max_epochs`` or when the
      validation loss has not improved for ``patience`` epochs; the best epoch's weights are kept.
    supervised_epochs: supervised training runs exactly this many epochs (cosine decay of the
      learning rate to zero) and keeps the last weights.
    batch_size, learning_rate, weight_decay: Adam(W) settings.
    validation_fraction: share of rows held out for early stopping (at least one row).
    quantization_weight: weight of the ``(|tanh z| - 1)^2`` penalty (unsupervised loss).
    centre_quantization_weight: the same penalty's weight with labels (CSQ's lambda).
    dropout: dropout rate on the hidden layer (and, unsupervised, on the input features).
    balance_weight: weight of the bit-balance term (unsupervised loss).
    n_neighbors: positives per row for the unsupervised loss (cosine kNN on the features).
    temperature: InfoNCE temperature on the cosine of relaxed codes (unsupervised loss).
    max_samples: train on at most this many rows (a random subset), bounding fit time.
    """

    method: ClassVar[str] = "deep"
    _fitted_arrays: ClassVar[tuple[str, ...]] = (
        "mean_",
        "projection_",
        "hidden_weight_",
        "hidden_bias_",
        "output_weight_",
        "output_bias_",
    )

    hidden_weight_: F64  # (d, hidden_units)
    hidden_bias_: F64  # (hidden_units,)
    output_weight_: F64  # (hidden_units, n_bits)
    output_bias_: F64  # (n_bits,)

    def __init__(
        self,
        n_bits: int = 64,
        random_state: int | None = 0,
        hidden_units: int | None = None,
        max_epochs: int = 100,
        patience: int = 8,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.1,
        quantization_weight: float = 0.1,
        balance_weight: float = 0.1,
        n_neighbors: int = 10,
        temperature: float = 0.3,
        dropout: float = 0.3,
        supervised_epochs: int = 20,
        centre_quantization_weight: float = 1e-3,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
    ) -> None:
        super().__init__(n_bits=n_bits, random_state=random_state)
        self.hidden_units = hidden_units
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.quantization_weight = quantization_weight
        self.balance_weight = balance_weight
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.dropout = dropout
        self.supervised_epochs = supervised_epochs
        self.centre_quantization_weight = centre_quantization_weight
        self.max_samples = max_samples

    @classmethod
    def min_samples(cls, n_bits: int) -> int:
        # A validation split of >= 2 rows, a training batch with negatives, and neighbours.
        return 20

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.hidden_units is not None:
            _check_positive("hidden_units", self.hidden_units, integer=True)
        for name in ("max_epochs", "patience", "batch_size", "n_neighbors", "supervised_epochs"):
            _check_positive(name, getattr(self, name), integer=True)
        for name in ("learning_rate", "temperature"):
            _check_positive(name, getattr(self, name), integer=False)
        for name in ("weight_decay", "quantization_weight", "centre_quantization_weight", "balance_weight", "dropout"):
            _check_positive(name, getattr(self, name), integer=False, allow_zero=True)
        if float(self.dropout) >= 1:
            raise HasherError(f"dropout must be below 1, got {self.dropout!r}")
        vf = self.validation_fraction
        _check_positive("validation_fraction", vf, integer=False)
        if float(vf) >= 0.5:
            raise HasherError(f"validation_fraction must be below 0.5, got {vf!r}")
        ms = self.max_samples
        if ms is not None:
            _check_positive("max_samples", ms, integer=True)
            if int(ms) < self.min_samples(int(self.n_bits)):
                raise HasherError(f"max_samples={ms} is below the {self.min_samples(int(self.n_bits))} rows deep needs")

    # --- encoding (numpy, float64) ------------------------------------------------------

    def project(self, X: npt.ArrayLike) -> F64:
        """Real-valued network outputs ``z``: (n, n_bits) float64; the code is ``z > 0``."""
        self._check_fitted()
        arr = check_array(X)
        self._check_dim(arr.shape[1])
        h = arr - self.mean_
        hidden = np.maximum(h @ self.hidden_weight_ + self.hidden_bias_, 0.0)
        return h @ self.projection_ + hidden @ self.output_weight_ + self.output_bias_

    # --- training (torch) ---------------------------------------------------------------

    def fit(
        self, X: npt.ArrayLike, y: npt.ArrayLike | None = None, *, progress: ProgressCallback | None = None
    ) -> DeepHasher:
        """Train on ``X: (n_samples, n_features)``; ``y`` (n_samples,) labels or None. Returns self.

        progress: called as ``progress(epoch, train_loss)`` after each epoch; not stored.
        """
        self._validate_params()
        arr = check_array(X)
        n_bits = int(self.n_bits)
        need = self.min_samples(n_bits)
        if arr.shape[0] < need:
            raise NotEnoughDataError(
                f"{self.method} with n_bits={self.n_bits} needs at least {need} training vectors, "
                f"got {arr.shape[0]}; add images or use a non-learned method such as 'lsh'"
            )
        labels, n_classes = (np.full(arr.shape[0], -1, np.int64), 0) if y is None else _label_indices(y, arr.shape[0])
        if n_classes == 1:
            raise NotEnoughDataError(
                f"the labels name only one class; supervised {self.method} hashing needs at least 2 "
                "classes in y (or pass y=None to train without labels)"
            )
        rng = np.random.default_rng(self.random_state)
        if self.max_samples is not None and arr.shape[0] > int(self.max_samples):
            rows = np.sort(rng.choice(arr.shape[0], size=int(self.max_samples), replace=False))
            arr, labels = arr[rows], labels[rows]

        started = time.perf_counter()
        weights = _train(self, arr, labels, n_classes, rng, progress)
        mean, scale, lin, w1, b1, w2, b2, history, kept_epoch = weights
        # Fold the standardisation into the first-layer weights: ((x - m) / s) @ W == (x - m) @ (W / s).
        self.mean_ = np.ascontiguousarray(mean, dtype=np.float64)
        self.projection_ = np.ascontiguousarray(lin / scale[:, None], dtype=np.float64)
        self.hidden_weight_ = np.ascontiguousarray(w1 / scale[:, None], dtype=np.float64)
        self.hidden_bias_ = np.ascontiguousarray(b1, dtype=np.float64)
        self.output_weight_ = np.ascontiguousarray(w2, dtype=np.float64)
        self.output_bias_ = np.ascontiguousarray(b2, dtype=np.float64)
        self.n_features_in_ = int(arr.shape[1])
        # Diagnostics (not serialised): per-epoch (train, validation) loss and the kept epoch.
        self.loss_curve_ = np.asarray(history, dtype=np.float64).reshape(-1, 2)
        self.best_epoch_ = int(kept_epoch)
        self.supervised_ = n_classes >= 2
        self.fit_seconds_ = time.perf_counter() - started
        logger.info(
            "deep hasher (%d bits, %s) trained %d epochs, kept epoch %d, %.1f s",
            n_bits, "supervised" if self.supervised_ else "unsupervised",
            len(self.loss_curve_), self.best_epoch_, self.fit_seconds_,
        )
        return self


def _standardise(X: F64) -> tuple[F64, F64]:
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    floor = _RELATIVE_STD_FLOOR * max(float(std.max()), 1e-300)
    return mean, np.where(std > floor, std, 1.0)


def _train(
    hasher: DeepHasher,
    X: F64,
    labels: npt.NDArray[np.int64],
    n_classes: int,
    rng: np.random.Generator,
    progress: ProgressCallback | None,
) -> tuple[Any, ...]:
    import torch  # heavy; only training needs it

    n, d = X.shape
    n_bits = int(hasher.n_bits)
    supervised = n_classes >= 2
    hidden = int(hasher.hidden_units) if hasher.hidden_units is not None else (512 if supervised else 256)
    use_neighbours = not supervised or bool((labels < 0).any())

    mean, scale = _standardise(X)
    Z = (X - mean) / scale

    order = rng.permutation(n)
    n_val = max(2, round(float(hasher.validation_fraction) * n))
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    if supervised and not use_neighbours:
        # Nothing stops on the held-out loss, so every labelled row trains (+~0.01 mAP); the
        # "validation" loss is then measured on training rows, a diagnostic only.
        train_rows = np.arange(n)

    # Linear path start: ITQ on the training rows (in standardised coordinates) when
    # unsupervised, so training starts at ITQ codes; small random otherwise.
    lin0 = None
    if not supervised and n_bits <= min(d, len(train_rows) - 1):
        try:
            itq = ITQHasher(n_bits=n_bits, random_state=int(rng.integers(2**31))).fit(X[train_rows])
            lin0 = itq.projection_ * scale[:, None]
            lin0 = lin0 / max(float(np.std(Z[train_rows] @ lin0)), 1e-12)  # unit-variance outputs
        except HasherError:  # degenerate data: fall back to a random start
            lin0 = None
    seed = int(rng.integers(2**31))

    knn_train = knn_val = None
    if use_neighbours:
        k = int(min(hasher.n_neighbors, len(train_rows) - 1))
        unit = _l2_normalise(X)
        knn_train = _knn(unit[train_rows], unit[train_rows], k, exclude_self=True)
        knn_val = _knn(unit[val_rows], unit[train_rows], k, exclude_self=False)

    dropout_p = float(hasher.dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Zt = torch.from_numpy(Z.astype(np.float32))
        lin = torch.nn.Linear(d, n_bits, bias=False)
        if lin0 is not None:
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(lin0.T.astype(np.float32)))
        mlp = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout_p), torch.nn.Linear(hidden, n_bits)
        )
        # Supervised: no input dropout (see the module docstring).
        drop_input = torch.nn.Dropout(0.0 if supervised else dropout_p)
        with torch.no_grad():  # the residual starts at zero: the first codes are the linear path's
            residual_out = cast(torch.nn.Linear, mlp[3])
            residual_out.weight.mul_(0.0 if lin0 is not None else 1.0)
            residual_out.bias.zero_()
        params = list(lin.parameters()) + list(mlp.parameters())
        opt = torch.optim.AdamW(params, lr=float(hasher.learning_rate), weight_decay=float(hasher.weight_decay))

        centres = None
        if supervised:
            centres = torch.from_numpy(((_class_centres(n_classes, n_bits, rng) + 1) / 2).astype(np.float32))
        labels_t = torch.from_numpy(labels)
        qw = float(hasher.centre_quantization_weight if supervised else hasher.quantization_weight)
        bw = float(hasher.balance_weight)
        tau = float(hasher.temperature)

        def forward(rows: torch.Tensor) -> torch.Tensor:
            x = drop_input(Zt[rows])
            z: torch.Tensor = lin(x) + mlp(x)
            return z

        def loss_of(rows: np.ndarray, positives: np.ndarray | None) -> torch.Tensor:
            rows_t = torch.from_numpy(rows)
            z = forward(rows_t)
            u = torch.tanh(z)
            loss = qw * ((u.abs() - 1.0) ** 2).mean()
            if supervised:
                assert centres is not None
                lab = labels_t[rows_t]
                mask = lab >= 0
                if bool(mask.any()):
                    # BCE of sigmoid(2z) = (tanh z + 1) / 2 toward the class centre in {0, 1}.
                    loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                        2.0 * z[mask], centres[lab[mask]]
                    )
            if positives is not None:
                up = torch.tanh(forward(torch.from_numpy(positives)))
                a = torch.nn.functional.normalize(u, dim=1)
                b = torch.nn.functional.normalize(up, dim=1)
                logits = a @ b.T / tau
                target = torch.arange(len(rows))
                loss = loss + 0.5 * (
                    torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)
                )
                loss = loss + bw * (u.mean(dim=0) ** 2).mean()
            return loss

        batch = int(min(hasher.batch_size, len(train_rows)))
        # Fixed validation positives (each row's nearest neighbour), so the loss is comparable.
        val_pos = None if knn_val is None else train_rows[knn_val[:, 0]]

        def validation_loss() -> float:
            mlp.eval()
            drop_input.eval()
            with torch.no_grad():
                total = 0.0
                for s in range(0, len(val_rows), batch):
                    r = val_rows[s : s + batch]
                    p = None if val_pos is None else val_pos[s : s + batch]
                    total += float(loss_of(r, p)) * len(r)
            mlp.train()
            drop_input.train()
            return total / len(val_rows)

        history: list[tuple[float, float]] = []
        best = (math.inf, [p.detach().clone() for p in params])
        kept_epoch, stale = 0, 0
        n_epochs = int(hasher.supervised_epochs if supervised else hasher.max_epochs)
        scheduler = None
        if supervised:  # fixed length, cosine decay per step to zero
            steps_per_epoch = sum(1 for s in range(0, len(train_rows), batch) if len(train_rows) - s >= 2)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_epochs * steps_per_epoch))
        for epoch in range(1, n_epochs + 1):
            perm = rng.permutation(len(train_rows))
            total, count = 0.0, 0
            for s in range(0, len(perm), batch):
                idx = perm[s : s + batch]
                if len(idx) < 2:
                    continue
                pos = None
                if knn_train is not None:
                    pick = rng.integers(knn_train.shape[1], size=len(idx))
                    pos = train_rows[knn_train[idx, pick]]
                loss = loss_of(train_rows[idx], pos)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            train_loss = total / max(count, 1)
            val_loss = validation_loss()
            history.append((train_loss, val_loss))
            if progress is not None:
                progress(epoch, train_loss)
            if supervised:  # fixed schedule: keep the last epoch
                best, kept_epoch = (val_loss, [p.detach().clone() for p in params]), epoch
            elif val_loss < best[0] - 1e-6:
                best, kept_epoch = (val_loss, [p.detach().clone() for p in params]), epoch
                stale = 0
            else:
                stale += 1
                if stale >= int(hasher.patience):
                    break
        w_lin, w1, b1, w2, b2 = (p.numpy().astype(np.float64) for p in best[1])
    return mean, scale, w_lin.T, w1.T, b1, w2.T, b2, history, max(kept_epoch, 1)
