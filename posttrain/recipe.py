"""The recipe schema: the one contract between the YAML file, the DAG and the training job.

Imports nothing from airflow, torch or ray: the DAG parser, the operators and the Ray workers all
load it. Relative paths in a recipe are resolved against the recipe file's folder, so a recipe can
sit next to its data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from posttrain import instance_types
from posttrain.components import COMPONENTS, check_component
from posttrain.config_base import NonBlank, Strict
from posttrain.data_config import DataConfig, DataValidationConfig, PackingConfig  # noqa: F401 (re-exported)
from posttrain.ec2_config import Ec2Config
from posttrain.eval_metrics import MetricName, default_mode, paradigm_metrics
from posttrain.paradigm_config import PARADIGM_DATA, DpoConfig, GrpoConfig, KdConfig, Paradigm
from posttrain.promotion_config import PromotionConfig  # noqa: F401 (re-exported)
from posttrain.recipe_yaml import YamlProblem, load_yaml
from posttrain.rewards import user_code_imports
from posttrain.uris import check_model_uri, resolve_uri

SCHEDULE_PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")
# Metrics that generate with vLLM (which serves the Hugging Face weights only, never a custom head).
GENERATION_METRICS = ("exact_match",)
# How long a dashboard may fail transiently while a job is followed (the hooks' default too).
DEFAULT_RETRY_WINDOW_S = 300.0


class RecipeError(ValueError):
    """A recipe that does not validate. Each error is (field path, message); str() gives one
    `source: field.path: message` line per error."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {loc}: {msg}" for loc, msg in errors))


_Strict = Strict  # every section refuses unknown fields


class LoraConfig(_Strict):
    rank: int = Field(16, gt=0, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[NonBlank] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    # The export always writes the adapter; the merged model (base + adapter, what vLLM serves
    # without LoRA support) too unless this is false: then evaluation merges in a scratch folder
    # and promotion publishes the adapter alone.
    merge_on_export: bool = True


class ComponentsConfig(_Strict):
    """Task components injected into the model, each an import path 'package.module:Name'
    (posttrain/components.py has the contract). Only the names below exist; another is refused."""

    head: NonBlank | None = Field(None, description="An nn.Module class built as Name(config) that transforms the "
                                  "final hidden states [..., hidden_size] before the output projection (the "
                                  "chunked loss scores its output); trained, checkpointed and exported to "
                                  "model/components/")

    @field_validator("head")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        return None if value is None else check_component("head", value)

    def named(self) -> dict[str, str]:
        """The components the recipe sets, by name."""
        return {name: path for name, path in self.model_dump().items() if path is not None}


class ModelConfig(_Strict):
    base: NonBlank
    tokenizer: NonBlank | None = None
    lora: LoraConfig | None = None
    components: ComponentsConfig = Field(default_factory=ComponentsConfig)
    pad_vocab_to_multiple_of: int = Field(64, ge=1, le=4096)

    @field_validator("base", "tokenizer")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        # s3:// is read through each node's model cache (posttrain/model_cache.py).
        return None if value is None else check_model_uri(value)


class TrainingConfig(_Strict):
    max_steps: int | None = Field(100, ge=1, le=10_000_000, description="Optimizer steps to train")
    epochs: int | None = Field(None, ge=1, description="Passes over the training data, over all data-parallel "
                               "ranks together (instead of max_steps)")
    learning_rate: float = Field(2.0e-5, gt=0, le=1, description="Peak learning rate")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    loss_chunk_tokens: int = Field(1024, ge=1)  # positions per chunk of the cross-entropy (memory vs speed)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sharding: Literal["auto", "ddp", "fsdp", "fsdp_tp"] = "auto"
    tensor_parallel: int = Field(1, ge=1)
    activation_checkpointing: Literal["auto"] | bool = "auto"
    compile: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, description="Random seed of the data order, the initialisation and sampling")

    @model_validator(mode="after")
    def _length(self) -> TrainingConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        if self.epochs is not None and self.max_steps is not None:
            if "max_steps" in self.model_fields_set:
                raise ValueError(f"set max_steps or epochs, not both (max_steps={self.max_steps}, "
                                 f"epochs={self.epochs})")
            self.max_steps = None  # the default step count gives way to the epochs asked for
        if self.sharding == "fsdp_tp" and self.tensor_parallel < 2:
            raise ValueError("sharding 'fsdp_tp' needs tensor_parallel ≥ 2 (the tensor-parallel degree)")
        if self.tensor_parallel > 1 and self.sharding in ("ddp", "fsdp"):
            raise ValueError(f"tensor_parallel {self.tensor_parallel} needs sharding 'fsdp_tp' (or 'auto'), "
                             f"got {self.sharding!r}")
        return self


class ComputeConfig(_Strict):
    provider: Literal["local", "ray", "ec2"] = "local"
    workers: int = Field(2, ge=1, le=4096)
    gpus_per_worker: int = Field(0, ge=0, le=16)
    cpus_per_worker: int = Field(1, ge=1)
    ray_conn_id: NonBlank = "ray_default"
    startup_timeout_s: int = Field(120, ge=10)
    memory_per_worker_gib: float | None = Field(None, gt=0)  # device memory budget `posttrain plan` checks
    ec2: Ec2Config | None = None

    @model_validator(mode="after")
    def _ec2(self) -> ComputeConfig:
        if (self.provider == "ec2") != (self.ec2 is not None):
            raise ValueError("compute.ec2 is required with provider 'ec2' and only allowed with it")
        if self.ec2 is not None and self.gpus_per_worker:
            have = self.ec2.worker_nodes * instance_types.gpus(self.ec2.worker_instance_type)
            need = self.workers * self.gpus_per_worker
            if need > have:
                raise ValueError(f"{self.workers} workers × {self.gpus_per_worker} GPUs need {need} GPUs; "
                                 f"{self.ec2.worker_nodes} × {self.ec2.worker_instance_type} have {have}")
        return self


class EvaluationConfig(_Strict):
    engine: Literal["vllm"] = "vllm"
    max_new_tokens: int = Field(64, ge=1, le=32768)
    max_samples: int = Field(64, ge=1)
    # Default: every metric of the paradigm (posttrain/eval_metrics.py).
    metrics: list[MetricName] | None = Field(None, min_length=1)


class StorageConfig(_Strict):
    root: NonBlank = "file:///tmp/posttrain"
    conn_id: NonBlank | None = None

    @field_validator("root")
    @classmethod
    def _scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"storage scheme {scheme!r} is not supported; use file:// or s3://")
        return value.rstrip("/")


class TrackingConfig(_Strict):
    # Default: sqlite:///<storage root>/<recipe name>/mlflow.db; for an s3:// root, each run's own
    # train/mlflow.db in its workspace (training_lib/tracking.py).
    mlflow_uri: NonBlank | None = None
    # Where an MLflow UI serving that store is browsed (the task links point there); default: the
    # tracking server itself for an http(s) mlflow_uri, none for SQLite (`mlflow ui` can serve it).
    ui_url: NonBlank | None = None
    peak_tflops: float | None = Field(None, gt=0)  # device peak for MFU; default: a table of known GPUs


class AirflowConfig(_Strict):
    """How the Airflow tasks wait for the Ray jobs of train and evaluate."""

    deferrable: bool | None = Field(None, description="Wait in the triggerer (true) or in a worker slot (false); "
                                    "default: Airflow's [operators] default_deferrable")
    job_timeout_s: int = Field(24 * 3600, ge=10, description="How long train or evaluate may run: the deferral "
                               "timeout while deferred, the task's execution timeout otherwise; then the job is "
                               "stopped and the task fails")
    dashboard_retry_window_s: float = Field(DEFAULT_RETRY_WINDOW_S, ge=0, le=24 * 3600, description="How long "
                                            "the Ray dashboard may keep failing transiently (refused, reset, 5xx, "
                                            "timeouts) before the task fails and stops its job")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    paradigm: Paradigm = "sft"
    description: str = ""
    schedule: str | None = None
    trigger_on_assets: list[NonBlank] = Field(default_factory=list)
    owner: NonBlank = "posttrain"
    tags: list[NonBlank] = Field(default_factory=list)
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    airflow: AirflowConfig = Field(default_factory=AirflowConfig)
    dpo: DpoConfig | None = None  # paradigm dpo (defaults when omitted)
    kd: KdConfig | None = None  # paradigm kd (required: it names the teacher)
    grpo: GrpoConfig | None = None  # paradigm grpo (required: it names the rewards)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is None or value in SCHEDULE_PRESETS:
            return value
        fields = value.split()
        if len(fields) not in (5, 6) or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{value!r} is neither a cron expression nor one of " + ", ".join(SCHEDULE_PRESETS))
        return value

    @model_validator(mode="after")
    def _cross_field(self, info: Any) -> Recipe:
        if self.schedule is not None and self.trigger_on_assets:
            raise ValueError("schedule and trigger_on_assets are exclusive: a DAG runs on a timetable or on assets")
        if self.data.format != PARADIGM_DATA[self.paradigm]:
            raise ValueError(f"paradigm {self.paradigm!r} needs data.format {PARADIGM_DATA[self.paradigm]!r}, "
                             f"got {self.data.format!r}")
        self._paradigm_sections()
        tp = self.training.tensor_parallel
        if tp > 1 and self.compute.workers % tp:
            raise ValueError(f"training.tensor_parallel {tp} does not divide compute.workers "
                             f"{self.compute.workers}: each tensor-parallel group is {tp} workers")
        if tp > 1 and self.model.lora is not None:
            raise ValueError("tensor parallel with LoRA is not implemented yet; use sharding fsdp (FSDP2 shards "
                             "the frozen base) or drop model.lora")
        if not self.data.eval:
            raise ValueError("data.eval is required: evaluation and promotion compare models on an eval split")
        self._evaluation_defaults()
        if self.promotion.metric not in self.evaluation.metrics:
            raise ValueError(f"promotion.metric {self.promotion.metric!r} is not produced by evaluation; "
                             f"evaluation.metrics is {self.evaluation.metrics}")
        base_dir = (info.context or {}).get("base_dir") if info is not None else None
        if base_dir is not None:
            self.model.base = resolve_uri(self.model.base, base_dir)
            if self.model.tokenizer:
                self.model.tokenizer = resolve_uri(self.model.tokenizer, base_dir)
            self.data.train = resolve_uri(self.data.train, base_dir)
            if self.data.eval:
                self.data.eval = resolve_uri(self.data.eval, base_dir)
            self.storage.root = resolve_uri(self.storage.root, base_dir)
            if self.kd is not None:
                self.kd.teacher = resolve_uri(self.kd.teacher, base_dir)
        return self

    def _paradigm_sections(self) -> None:
        """Each paradigm's own section: filled with defaults for it, refused for any other."""
        for name, default in (("dpo", DpoConfig), ("kd", None), ("grpo", None)):
            if self.paradigm == name and getattr(self, name) is None:
                if default is None:
                    raise ValueError(f"paradigm {name!r} needs its section {name!r}")
                setattr(self, name, default())
            elif self.paradigm != name and getattr(self, name) is not None:
                raise ValueError(f"section {name!r} is for paradigm {name!r}; this recipe's paradigm is "
                                 f"{self.paradigm!r}")
        if self.dpo is not None and self.dpo.reference == "on_the_fly" and self.model.lora is None:
            raise ValueError("dpo.reference 'on_the_fly' scores with the base model (LoRA adapters disabled) "
                             "and needs model.lora; without LoRA use 'precomputed'")

    def _components(self) -> None:
        """What a custom head cannot do yet is refused here, before any cluster starts."""
        if self.model.components.head is None:
            return
        if self.paradigm != "sft":
            raise ValueError(f"model.components.head is implemented for paradigm 'sft' only; paradigm "
                             f"{self.paradigm!r} scores with the model's own output (DPO's reference, the KD "
                             "teacher's divergence, GRPO's vLLM rollouts) and does not apply a head yet")
        generated = [m for m in self.evaluation.metrics or () if m in GENERATION_METRICS]
        if generated:
            raise ValueError(f"evaluation.metrics {generated}: generation runs on vLLM, which cannot run the custom "
                             "model.components.head; evaluate with eval_loss (the default with a head), which "
                             "includes it")
        if self.evaluation.metrics is None:
            self.evaluation.metrics = [m for m in paradigm_metrics(self.paradigm) if m not in GENERATION_METRICS]

    def _evaluation_defaults(self) -> None:
        self._components()
        allowed = paradigm_metrics(self.paradigm)
        if self.evaluation.metrics is None:
            self.evaluation.metrics = list(allowed)
        wrong = [m for m in self.evaluation.metrics if m not in allowed]
        if wrong:
            raise ValueError(f"evaluation.metrics {wrong} are not measured for paradigm {self.paradigm!r}; "
                             f"allowed: {list(allowed)}")
        if self.promotion.metric is None:
            self.promotion.metric = allowed[0]
        if self.promotion.mode is None:
            self.promotion.mode = default_mode(self.promotion.metric)

    @property
    def dag_id(self) -> str:
        return f"posttrain__{self.name}"

    @property
    def tokenizer_uri(self) -> str:
        return self.model.tokenizer or self.model.base

    @property
    def champion_uri(self) -> str:
        return f"{self.storage.root}/{self.name}/champion.json"


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and tuple(err["loc"][:2]) == ("model", "components"):
            msg = f"unknown component; allowed: {', '.join(COMPONENTS)}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "literal_error" and "expected" in (err.get("ctx") or {}):
            msg = f"{err['input']!r} is not allowed; allowed: {err['ctx']['expected']}"
        out.append((loc, msg))
    return out


def parse_recipe(data: Any, source: str = "<recipe>", base_dir: str | Path | None = None,
                 import_user_code: bool = True) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(source, [("(recipe)", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        with user_code_imports(import_user_code):
            return Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(source, _errors(exc)) from None


def load_recipe(path: str | Path, import_user_code: bool = True) -> Recipe:
    """Read and validate a recipe file; every problem is reported as `file: field.path: message`.
    `import_user_code` false: user functions the recipe names (GRPO rewards) are checked for their
    form only, not imported (the DAG processor parses recipes so)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [("(file)", str(exc))]) from None
    try:
        data = load_yaml(text)
    except YamlProblem as exc:
        raise RecipeError(str(path), exc.problems) from None
    return parse_recipe(data, str(path), base_dir=path.resolve().parent, import_user_code=import_user_code)
