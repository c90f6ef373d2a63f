"""Is the contrastive term working? A watch over the logged CRD diagnostics.

The CRD term only teaches while the student's projected feature is closer to the teacher's (the
positive pair) than the bank rows of other examples are (the negatives). When both projections
drift onto one common direction, negatives become as similar as the positive, ``L_CRD`` climbs
back towards ``log(K+1)`` and the term carries no signal while still costing its share of the
loss. :class:`CollapseWatch` spots that from the scalars the monitor logs every
``logging.log_every`` steps (means over every rank), so it adds no synchronisation.

The rule: the contrastive term has **collapsed** when, in ``windows`` consecutive log windows,
the positive is aligned (``bank/pos_sim`` >= ``aligned``) but the negatives are nearly as
similar (``bank/sim_gap`` < ``gap``). An untrained start (positive not yet aligned) is not a
collapse. The watch warns once per run.
"""
from __future__ import annotations

from typing import Optional

# Diagnostics written to results.json (the last logged value of each).
DIAGNOSTIC_PREFIXES = ("bank/", "crd/")


class CollapseWatch:
    def __init__(self, windows: int = 3, gap: float = 0.25, aligned: float = 0.5):
        self.windows, self.gap, self.aligned = windows, gap, aligned
        self.streak = 0
        self.warned = False

    def observe(self, step: int, scalars: dict) -> Optional[str]:
        """The warning line, the first time the rule holds at ``step``; else None."""
        if "bank/sim_gap" not in scalars or "bank/pos_sim" not in scalars:
            return None
        collapsed = scalars["bank/pos_sim"] >= self.aligned and scalars["bank/sim_gap"] < self.gap
        self.streak = self.streak + 1 if collapsed else 0
        if self.streak < self.windows or self.warned:
            return None
        self.warned = True
        ratio = scalars.get("crd/loss_over_log_k1", float("nan"))
        return (f"warning: step {step}: the contrastive term has collapsed: the negatives are nearly as similar "
                f"to the teacher's features as the positives (bank/pos_sim {scalars['bank/pos_sim']:.2f}, "
                f"bank/neg_sim {scalars['bank/neg_sim']:.2f}, L_CRD/log(K+1) {ratio:.2f}) for "
                f"{self.windows} log windows, so CRD no longer separates examples: lower training.lr, and keep "
                f"method.crd_temperature near the default 0.07 (a larger one narrows the gap)")

    def state_dict(self) -> dict:
        return {"streak": self.streak, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.warned = int(state.get("streak", 0)), bool(state.get("warned", False))


def last_diagnostics(scalars: dict) -> dict:
    """The CRD and bank diagnostics among logged ``scalars`` (for results.json)."""
    return {k: round(float(v), 6) for k, v in scalars.items() if k.startswith(DIAGNOSTIC_PREFIXES)}
