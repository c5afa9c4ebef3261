"""The one table of evaluation metrics: what each measures, which paradigms produce it, and which
direction is better. The recipe schema (allowed `evaluation.metrics`, the default promotion metric
and mode), the evaluate stage and promotion all read it. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    paradigms: tuple[str, ...]  # the paradigms whose evaluate stage measures it
    lower_is_better: bool
    description: str


# Order matters: a paradigm's metrics are listed in this order, and its first is the default
# promotion metric.
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("eval_loss", ("sft", "kd"), True, "cross-entropy per assistant token on the eval blocks"),
    Metric("exact_match", ("sft", "kd"), False, "fraction of greedy replies equal to the reference reply"),
    Metric("kl_to_teacher", ("kd",), True, "the recipe's divergence to the teacher per assistant token"),
    Metric("preference_accuracy", ("dpo",), False, "fraction of eval pairs whose chosen reply has the higher "
                                                   "implicit reward"),
    Metric("reward_margin", ("dpo",), False, "mean implicit reward of chosen minus rejected replies"),
    Metric("dpo_loss", ("dpo",), True, "the DPO/IPO loss on the eval pairs"),
    Metric("reward_mean", ("grpo",), False, "mean weighted reward of greedy answers to the eval prompts"),
)}

MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]  # the schema's allowed values, from the table


def paradigm_metrics(paradigm: str) -> tuple[str, ...]:
    """What the evaluate stage can measure for `paradigm`; the first is the default promotion metric."""
    return tuple(name for name, m in METRICS.items() if paradigm in m.paradigms)


def default_mode(metric: str) -> Literal["min", "max"]:
    """min for losses and divergences, max otherwise (an unknown metric is refused by the schema)."""
    known = METRICS.get(metric)
    return "min" if known is not None and known.lower_is_better else "max"
