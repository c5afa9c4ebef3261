"""Where posttrain keeps what it generates on this machine (Ray temp, Airflow home, caches).

`POSTTRAIN_HOME` if set, else `.posttrain/` under the current directory: the demo and the tests
set it to an ignored folder of the repo so nothing lands in $HOME or /tmp.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def posttrain_home() -> Path:
    return Path(os.environ.get("POSTTRAIN_HOME") or Path.cwd() / ".posttrain").resolve()


def safe_name(value: str) -> str:
    """A run id (e.g. 'manual__2026-11-25T21:00:00+00:00') as a path segment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_")


def run_workspace(storage_root: str, recipe_name: str, run_id: str) -> str:
    return f"{storage_root}/{recipe_name}/runs/{safe_name(run_id)}"


def cache_env() -> dict[str, str]:
    """Cache locations for libraries that default to $HOME or /tmp, under posttrain_home()."""
    cache = posttrain_home() / "cache"
    return {
        "HF_HOME": str(cache / "huggingface"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "XDG_CACHE_HOME": str(cache),
        **({"TMPDIR": str(tmp)} if len(str(tmp := posttrain_home() / "tmp")) <= MAX_TMPDIR else {}),
    }


# Libraries put Unix sockets under TMPDIR (vLLM's ZMQ ipc paths, multiprocessing's listeners), and
# socket paths may not exceed 107 bytes: a deep checkout keeps the system's temp dir.
MAX_TMPDIR = 48


# Ray puts Unix sockets under its temp dir, and a socket path may not exceed 107 bytes. The longest
# one Ray makes (2.60) is a dashboard module's: "<temp>/session_<date>_<time>_<usec>_<pid>/sockets/
# dash_TaskEventsHead"; its length past <temp> depends on how many digits a pid can have here.
_RAY_SOCKET_TAIL = len("/session_2026-11-29_20-07-39_549032_") + len("/sockets/dash_TaskEventsHead")
_MAX_UNIX_SOCKET_PATH = 107


def _pid_digits() -> int:
    try:
        return len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        return 7  # Linux's largest pid_max is 4194304


def ray_temp_dir(name: str) -> Path:
    """A Ray temp dir for one cluster: under posttrain_home()/ray where Ray's socket paths fit,
    else (a deep checkout) a short per-user folder under /tmp."""
    limit = _MAX_UNIX_SOCKET_PATH - _RAY_SOCKET_TAIL - _pid_digits()
    preferred = posttrain_home() / "ray" / name
    if len(str(preferred)) <= limit:
        return preferred
    return Path(f"/tmp/posttrain-ray-{os.getuid()}") / name


def use_repo_tmpdir() -> None:
    """Point this process's (and its children's) temp files at posttrain_home()/tmp."""
    import tempfile

    tmp = cache_env().get("TMPDIR")
    if tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = None  # gettempdir() caches its first answer
