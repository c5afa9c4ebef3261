"""Per-step training metrics: written as JSON lines to the workspace and echoed as progress lines
(which the Airflow task log shows through the Ray job's log)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path


class StepLogger:
    def __init__(self, path: Path, enabled: bool, total_steps: int):
        self.path, self.enabled, self.total_steps = path, enabled, total_steps
        self.started = time.perf_counter()
        self.last_time = self.started
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int) -> dict:
        now = time.perf_counter()
        elapsed, self.last_time = now - self.last_time, now
        record = {
            "step": step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                  f"tokens/s {record['tokens_per_s']}", flush=True)
        return record


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
