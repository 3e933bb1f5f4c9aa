"""Is a trained model better than guessing? The chance-level guard shared by ``train``, ``build`` and benchmarks.

A classifier that always answers the majority class of the test set scores ``max_c p_c``; a network whose
signal died in a too-sparse layer ends exactly there (loss ln C, accuracy = the majority share). A run is
*at chance* when its accuracy is within ``margin`` (absolute, default 5 points) of that level. The margin
is wide enough that a model which learned something on a 10-class task (>= 15 % with a balanced test set)
is not flagged, and narrow enough that the collapsed runs of issue 14 (11.35 % on MNIST) are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHANCE_MARGIN = 0.05


def chance_accuracy(labels: Sequence[int] | np.ndarray, num_classes: int) -> float:
    """Accuracy of the best constant answer on ``labels`` (1/C for a balanced set)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size == 0:
        return 1.0 / max(num_classes, 1)
    return float(np.bincount(y, minlength=num_classes).max() / y.size)


def chance_message(accuracy: float, chance: float, margin: float = CHANCE_MARGIN) -> str | None:
    """One line when ``accuracy`` is within ``margin`` of ``chance`` (the model learned nothing), else None."""
    if accuracy != accuracy or accuracy < chance + margin:  # NaN counts as not learned
        return (f"the model is at chance level: accuracy {accuracy * 100:.2f} % vs {chance * 100:.2f} % for always "
                f"answering the most common class; train longer (--rounds), raise --density, or check --lr")
    return None
