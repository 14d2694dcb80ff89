"""The one training loop and what it is made of, one module per concern:

* :mod:`.loop`: ``fit`` (epochs, evaluation, per-epoch checkpoints, resuming), ``train_one_epoch``,
  ``evaluate``;
* :mod:`.optim`: optimizers and learning-rate schedules;
* :mod:`.losses`: extra loss terms (CS regulariser, distillation);
* :mod:`.calibrate`: batch-norm re-calibration and gradient accumulation for data-driven criteria;
* :mod:`.device`: device, precision (autocast, scaler, memory format) and seeding;
* :mod:`.distributed`: torchrun's process group, DDP, all-reduces and agreement between ranks;
* :mod:`.progress`: progress bars.
"""

from .calibrate import accumulate_gradients, recalibrate_bn
from .device import (
    Precision,
    cpu_has_fast_bf16,
    is_channels_last,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_memory_format,
    to_device,
)
from .distributed import is_main_process, rank, unwrap, world_size
from .loop import FitResult, evaluate, fit, load_training_state, train_one_epoch
from .losses import LossTerm, cs_regularizer, distillation
from .optim import Schedule, make_optimizer, make_schedule
from .progress import make_progress

__all__ = [
    "FitResult", "LossTerm", "Precision", "Schedule", "accumulate_gradients", "cpu_has_fast_bf16", "cs_regularizer",
    "distillation", "evaluate", "fit", "is_channels_last", "is_main_process", "load_training_state", "make_optimizer", "make_progress",
    "make_schedule", "rank", "recalibrate_bn", "resolve_device", "resolve_precision", "seed_everything", "set_memory_format", "to_device",
    "train_one_epoch", "unwrap", "world_size",
]
