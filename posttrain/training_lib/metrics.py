"""Per-step training metrics: written as JSON lines to the workspace (train/metrics.jsonl), logged
to MLflow, and echoed as progress lines (which the Airflow task log shows through the Ray job's
log). Only rank 0 logs.

On a local disk each record is appended as it comes. An object store has no append: the records
are kept in memory and the whole object is written again at most every FLUSH_S seconds, at every
checkpoint and at the end, so the workspace holds at least the steps up to its newest checkpoint.
A resumed job continues from the steps up to the checkpoint it resumed (records a killed job wrote
after its last checkpoint are dropped: the resumed job logs those steps again).

A record: step, loss, lr, grad_norm, tokens (since the previous record), tokens_per_s and
tokens_per_s_per_device, mfu (when the device's peak is known), peak_rss_mb (host), and on a GPU
peak_gpu_alloc_mb (torch's allocator) plus gpu_util_pct and gpu_mem_used_mb from NVML (when
nvidia-ml-py and a driver are there).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.planning import model_shape
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.flops import device_peak_flops, mfu, training_flops
from posttrain.training_lib.tracking import MlflowRun, flatten, tracking_uri

FLUSH_S = 30.0  # an object-store workspace: how stale its metrics.jsonl may get between checkpoints


class GpuStats:
    """Utilization and memory in use of this process's GPU, from NVML; empty without it."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handle: Any = None
        try:
            import pynvml  # optional (nvidia-ml-py, GPU images only): imported where its absence is handled

            pynvml.nvmlInit()
            # NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES (which Ray sets): find ours by UUID.
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())  # bytes: every nvidia-ml-py takes them
            self.nvml = pynvml
        except Exception:  # no nvidia-ml-py, no driver, an unknown device: no NVML fields
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            return {"gpu_util_pct": float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu),
                    "gpu_mem_used_mb": round(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20, 1)}
        except Exception:  # the NVML error classes are generated at import; any of them means no reading
            return {}


class StepLogger:
    """`log` is called every `log_every` steps; each step has the same number of tokens (packed
    blocks), so the tokens of the steps since the previous record are `tokens` × steps."""

    def __init__(self, store: Store, enabled: bool, total_steps: int, *, world: int = 1, device: str = "cpu",
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 tracker: MlflowRun | None = None, start_step: int = 0):
        self.store, self.enabled, self.total_steps = store, enabled, total_steps
        self.world, self.device, self.tracker = world, device, tracker
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.started = time.perf_counter()
        self.last_time, self.last_step = self.started, start_step
        self.gpu = GpuStats() if enabled and device == "cuda" else None
        self.rows: list[dict] = []
        self.flushed = time.monotonic()
        if enabled:
            logged = read_metrics(store)
            self.rows = [r for r in logged if r["step"] <= start_step]
            if len(self.rows) != len(logged) or not store.exists():
                store.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int,
            extra: dict[str, float] | None = None) -> dict:
        """One record; `extra` holds the paradigm's own metrics (e.g. DPO's rewards/accuracy)."""
        now = time.perf_counter()
        elapsed, self.last_time = now - self.last_time, now
        steps, self.last_step = max(1, step - self.last_step), step
        rate = tokens * steps / elapsed if elapsed > 0 else None
        record: dict[str, Any] = {
            "step": step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens": tokens * steps,
            "tokens_per_s": round(rate, 1) if rate else None,
            "tokens_per_s_per_device": round(rate / self.world, 1) if rate else None,
            **{k: round(v, 6) for k, v in (extra or {}).items()},
        }
        utilization = mfu(rate / self.world, self.flops_per_token, self.peak_flops) \
            if rate and self.flops_per_token else None
        if utilization is not None:
            record["mfu"] = round(utilization, 4)
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if not self.enabled:
            return record
        if self.device == "cuda":
            record["peak_gpu_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record.update(self.gpu.read() if self.gpu else {})
        self.rows.append(record)
        if self.store.local is not None:
            with self.store.local.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        elif time.monotonic() - self.flushed > FLUSH_S:
            self.flush()
        print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
              f"tokens/s {record['tokens_per_s']}" + (f" mfu {utilization:.1%}" if utilization is not None else ""),
              flush=True)
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step" and v is not None}, step)
        return record

    def flush(self) -> None:
        """Bring the workspace's copy of the records (and a per-run MLflow database) up to date."""
        if not self.enabled:
            return
        if self.store.local is None:
            self.store.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        if self.tracker is not None:
            self.tracker.save()
        self.flushed = time.monotonic()

    def close(self) -> None:
        """Log the summary of the job's records to MLflow, end the run, and flush."""
        if not self.enabled:
            return
        if self.tracker is not None:
            summary = summarize_rows(self.rows)
            self.tracker.log_metrics({f"summary.{k}": v for k, v in summary.items() if v is not None}, self.last_step)
            self.tracker.finish()
        self.flush()


def summarize_rows(rows: list[dict]) -> dict:
    """The job's totals and means over its metric records (all of them, across resumes)."""

    def mean(key: str, digits: int) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(values) / len(values), digits) if values else None

    return {
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "tokens": sum(r["tokens"] for r in rows),
        "mean_tokens_per_s": mean("tokens_per_s", 1),
        "mean_tokens_per_s_per_device": mean("tokens_per_s_per_device", 1),
        "mean_mfu": mean("mfu", 4),
    }


def read_metrics(path: Path | Store) -> list[dict]:
    """The records of a metrics.jsonl (a local file or an object), [] where there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_step_logger(recipe: Recipe, workspace: Store, rank: int, world: int, device: str, total_steps: int,
                     plan: dict, start_step: int = 0) -> StepLogger:
    """The training job's logger: FLOPs per token from the model's shape (LoRA-aware), the device's
    peak (recipe.tracking.peak_tflops overrides the table), and on rank 0 an MLflow run named after
    the workspace in the recipe's experiment, with the flattened recipe and plan as its params."""
    store = workspace / "train" / "metrics.jsonl"
    if rank != 0:
        return StepLogger(store, False, total_steps, world=world, device=device, start_step=start_step)
    shape = model_shape(recipe)
    flops = training_flops(shape, recipe.data.max_seq_len, recipe.model.lora).total if shape else None
    peak = device_peak_flops(device, plan.get("param_dtype", "float32"), recipe.tracking.peak_tflops)
    if flops is None or peak is None:
        print("MFU not reported: " + ("no Llama-family config.json for the model" if flops is None
                                      else f"no peak FLOP/s known for this {device} (set tracking.peak_tflops)"),
              flush=True)
    uri = tracking_uri(recipe, workspace)
    artifacts = None if recipe.tracking.mlflow_uri else f"{recipe.storage.root}/{recipe.name}/mlartifacts"
    tracker = MlflowRun(uri, recipe.name, workspace.name, workspace / "train" / "mlflow_run.json", artifacts)
    tracker.log_params({**flatten(recipe.model_dump(mode="json")), **flatten(plan, "plan."),
                        "workspace": workspace.uri,
                        "flops_per_token": f"{flops:.6g}" if flops else "None",
                        "peak_tflops": f"{peak / 1e12:g}" if peak else "None"})
    return StepLogger(store, True, total_steps, world=world, device=device, flops_per_token=flops, peak_flops=peak,
                      tracker=tracker, start_step=start_step)
