"""Steps skipped for NaN/Inf gradients: the count, one warning each, and the error when they do not stop.

The decision is global: the squared norm is all-reduced inside the round, so every rank sees the same non-finite
value, skips the same step and raises at the same boundary. With fp16 dynamic loss scaling a skipped step is
normal (the scale backs off); without it (fp32, bf16) a run that keeps producing NaN/Inf does not recover by
itself, so after ``limit`` committed steps in a row it raises ``AccoNonFiniteGradients``
(docs/failures-and-checkpoints.md).
"""

from __future__ import annotations

from deepspeed.utils import logger

__all__ = ["AccoNonFiniteGradients", "NonFiniteSteps"]


class AccoNonFiniteGradients(RuntimeError):
    """Too many optimizer steps in a row had NaN/Inf gradients (raised on every rank at the same boundary)."""


class NonFiniteSteps:
    """The committed steps skipped so far (``total``), in a row (``in_a_row``), and the last one's number."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0
        self.last_step = 0

    def skipped(self, step: int, estimate: bool, scaled: bool, limit: int) -> None:
        """A round of committed step ``step`` (1-based) had NaN/Inf gradients: count it (commits) and warn."""
        if estimate:
            logger.warning(f"ACCO: NaN/Inf gradients in the estimate round of step {step}: skipped on every rank "
                           "(the commit of this step sums them and skips too); check the data and the LR; see "
                           "docs/failures-and-checkpoints.md")
            return
        self.total += 1
        self.in_a_row += 1
        self.last_step = step
        logger.warning(f"ACCO: NaN/Inf gradients in the commit round of step {step}: skipped on every rank, weights "
                       f"unchanged ({self.total} skipped, {self.in_a_row} in a row"
                       + ("; the fp16 loss scale backs off" if scaled else f"; raising at {limit} in a row")
                       + "); check the data and the LR; see docs/failures-and-checkpoints.md")

    def committed(self) -> None:
        """A step committed with finite gradients."""
        self.in_a_row = 0

    def raise_if_persisting(self, scaled: bool, limit: int) -> None:
        """At a boundary (not in a flush: a checkpoint can still be saved): raise after ``limit`` in a row."""
        if not scaled and limit > 0 and self.in_a_row >= limit:
            raise AccoNonFiniteGradients(
                f"ACCO: {self.in_a_row} optimizer steps in a row (up to step {self.last_step}) had non-finite "
                "gradients (NaN/Inf) and were skipped on every rank; without fp16 loss scaling this does not "
                "recover by itself. The parameters are the last finite committed ones (identical on every rank). "
                "Check the data and the learning rate, or enable gradient clipping; "
                "AccoZeroOptimizer.max_consecutive_nonfinite_steps sets the limit (0: never raise).")
