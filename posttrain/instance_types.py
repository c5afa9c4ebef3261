"""EC2 instance types the schema knows: the shape of a name, the GPUs of each GPU type and their
memory (the training plan counts devices and budgets memory from them). A type missing from the table
is accepted as a CPU type when its name has the right shape; a GPU recipe on it is refused (no devices
to train on)."""

from __future__ import annotations

import re

SHAPE = re.compile(r"^[a-z][a-z0-9-]*\.(nano|micro|small|medium|large|xlarge|\d+xlarge|metal(-\d+xl)?)$")

# GPUs per instance (NVIDIA; the families people post-train on).
GPUS: dict[str, int] = {
    **{f"g5.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    **{f"g6.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    **{f"g6e.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6e.12xlarge": 4, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.4xlarge": 1, "p5.48xlarge": 8, "p5e.48xlarge": 8,
    "p5en.48xlarge": 8, "p6-b200.48xlarge": 8,
}


# Memory of one GPU of each family (GiB): the training plan's budget on EC2 when the recipe sets none.
GPU_MEMORY_GIB: dict[str, float] = {"g5": 24, "g6": 24, "g6e": 48, "p4d": 40, "p4de": 80, "p5": 80, "p5e": 141,
                                    "p5en": 141, "p6-b200": 180}


def gpus(instance_type: str) -> int:
    return GPUS.get(instance_type, 0)


def gpu_memory_gib(instance_type: str) -> float | None:
    return GPU_MEMORY_GIB.get(instance_type.split(".", 1)[0]) if gpus(instance_type) else None


def check_shape(instance_type: str) -> str:
    if not SHAPE.match(instance_type):
        raise ValueError(f"{instance_type!r} is not an EC2 instance type (family.size, e.g. g5.xlarge)")
    return instance_type
