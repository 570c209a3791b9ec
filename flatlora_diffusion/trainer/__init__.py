"""What happens inside a run: the Trainer (set-up, loop, checkpoints, images, LoRA files; see trainer.py) and
how a run stops early. train.py is the way in: it checks the input and holds the run folder around a Trainer."""

from .batches import LatentCache
from .cancel import CancelWatch
from .errors import Cancelled, TrainingDiverged
from .trainer import Trainer

__all__ = ["CancelWatch", "Cancelled", "LatentCache", "Trainer", "TrainingDiverged"]
