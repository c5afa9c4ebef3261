"""The recipe's `compute.ec2` section: one Ray cluster per run on EC2. Part of the recipe schema
(posttrain/recipe.py)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from posttrain import instance_types
from posttrain.config_base import NonBlank
from posttrain.config_base import Strict as _Strict


class Ec2Config(_Strict):
    """One Ray cluster per run on EC2: a head node and `worker_nodes` GPU workers running `image`."""
    aws_conn_id: NonBlank = "aws_default"
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
    head_instance_type: str = "m6i.xlarge"
    worker_instance_type: str
    worker_nodes: int = Field(ge=1, le=512)
    ami: str | None = Field(None, pattern=r"^ami-[0-9a-f]{8,17}$")
    ami_ssm_parameter: str | None = Field(None, pattern=r"^/[\w./-]+$")  # e.g. an AWS Deep Learning AMI's
    subnet_id: str = Field(pattern=r"^subnet-[0-9a-f]{8,17}$")
    security_group_ids: list[str] = Field(min_length=1)
    iam_instance_profile: NonBlank  # name or ARN
    key_name: NonBlank | None = None
    root_volume_gib: int = Field(200, ge=20, le=16384)
    spot_workers: bool = False  # spot workers, falling back to on-demand when there is no capacity
    public_ip: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    image: NonBlank  # the container image every node runs (docker/ray.Dockerfile)
    # How Airflow reaches the head's dashboard (Ray Jobs API): the head's private IP by default; a
    # tunnel or load balancer in front of it can be named here ({private_ip} / {public_ip} filled in).
    dashboard_url: NonBlank = "http://{private_ip}:8265"
    ray_port: int = Field(6379, ge=1, le=65535)
    launch_timeout_s: int = Field(900, ge=30)

    @field_validator("head_instance_type", "worker_instance_type")
    @classmethod
    def _instance_type(cls, value: str) -> str:
        return instance_types.check_shape(value)

    @field_validator("security_group_ids")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        bad = [g for g in value if not re.fullmatch(r"sg-[0-9a-f]{8,17}", g)]
        if bad:
            raise ValueError(f"not security group ids: {bad}")
        return value

    @model_validator(mode="after")
    def _ami(self) -> Ec2Config:
        if (self.ami is None) == (self.ami_ssm_parameter is None):
            raise ValueError("set exactly one of ami and ami_ssm_parameter")
        return self
