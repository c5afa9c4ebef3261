"""Training FLOPs per token of a decoder model (Llama, Mistral, Qwen3, Gemma 3, Qwen-style MoE),
the device's peak, and MFU.

Per token of a packed block of `seq_len`:
- forward: 2 × every linear weight (the block projections and lm_head; LoRA adapters A and B
  where LoRA targets them) plus the two attention matmuls (Q·Kᵀ and P·V), 2 × heads × head_dim ×
  context each per layer. Causal attention counts the keys a query sees, (seq_len + 1) / 2 on
  average over the block (fewer in a sliding-window layer, Gemma 3's local layers): what
  flash/efficient SDPA kernels compute, as they skip masked tiles.
- a sparse (MoE) block: the router (hidden → experts) and, per token, only the experts it is
  routed to (experts_per_token of them) plus any shared expert: active parameters, not all.
  (Packed blocks are attended per document, which does less; the count is for one document per
  block, so MFU is a little high when blocks hold many short documents.)
- backward, input gradients: 2 × the same weights and 2 × each attention matmul per operand
  that needs a gradient. They flow through frozen weights too, but only above the first trainable
  weight: with LoRA (frozen embedding) the first block's q/k/v take an input that needs no
  gradient, so neither those nor the attention operands that come only from frozen weights get one.
- backward, weight gradients: 2 × the trainable weights only (every linear in full fine-tuning;
  with LoRA only the adapters). The embedding lookup and its gradient have no matmul FLOPs.
Norms, rotary embeddings, activations and softmax (a few FLOPs per element, not per weight) are
left out, as is the recomputation of activation checkpointing: this is model FLOPs, so MFU stays
comparable with and without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from posttrain.planning import ModelShape
from posttrain.recipe import LoraConfig


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per token of one training step, by kind."""

    forward: float
    input_grads: float
    weight_grads: float

    @property
    def backward(self) -> float:
        return self.input_grads + self.weight_grads

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass
class _Count:
    forward: float = 0.0
    input_grads: float = 0.0
    weight_grads: float = 0.0

    def linear(self, name: str, fan_in: int, fan_out: int, x_grad: bool, lora: LoraConfig | None) -> bool:
        """Count one linear layer; returns whether its output needs a gradient."""
        dense = 2 * fan_in * fan_out
        self.forward += dense
        self.input_grads += dense if x_grad else 0
        self.weight_grads += dense if lora is None else 0
        if lora is None or name not in lora.target_modules:
            return x_grad or lora is None
        adapters = 2 * lora.rank * (fan_in + fan_out)  # A: fan_in → rank, B: rank → fan_out
        self.forward += adapters
        self.weight_grads += adapters
        # B's input (A's output) always needs its gradient (for A's); A's input only if x does.
        self.input_grads += 2 * lora.rank * fan_out + (2 * fan_in * lora.rank if x_grad else 0)
        return True

    def block(self, shape: ModelShape, matmul: float, h_grad: bool, lora: LoraConfig | None,
              sparse: bool = False) -> bool:
        """One decoder block; `matmul` is the FLOPs of one attention matmul per token. Returns
        whether the residual stream needs a gradient after the block."""
        p = shape.attention_projections()
        q, k, v = (self.linear(n, *p[n], h_grad, lora) for n in ("q_proj", "k_proj", "v_proj"))
        self.forward += 2 * matmul
        scores = q or k
        self.input_grads += matmul * (q + k)  # dQ = dS·K, dK = dSᵀ·Q
        self.input_grads += matmul * (scores + v)  # dP = dO·Vᵀ, dV = Pᵀ·dO
        h_grad = self.linear("o_proj", *p["o_proj"], scores or v, lora) or h_grad
        if not sparse:
            return self.mlp("", shape.hidden, shape.intermediate, h_grad, lora) or h_grad
        # The router, then each token's experts: LoRA never wraps these (3-D expert parameters, a
        # router that isn't a Linear), hence the prefixed names no target matches.
        routed = self.linear("moe.router", shape.hidden, shape.experts, h_grad, lora)
        for _ in range(shape.experts_per_token):
            routed = self.mlp("moe.expert.", shape.hidden, shape.expert_intermediate, h_grad, lora) or routed
        if shape.shared_expert_intermediate:
            routed = self.mlp("moe.shared.", shape.hidden, shape.shared_expert_intermediate, h_grad, lora) or routed
            self.linear("moe.shared_gate", shape.hidden, 1, h_grad, lora)
        return routed or h_grad

    def mlp(self, prefix: str, hidden: int, intermediate: int, h_grad: bool, lora: LoraConfig | None) -> bool:
        gate = self.linear(prefix + "gate_proj", hidden, intermediate, h_grad, lora)
        up = self.linear(prefix + "up_proj", hidden, intermediate, h_grad, lora)
        return self.linear(prefix + "down_proj", intermediate, hidden, gate or up, lora)


def training_flops(shape: ModelShape, seq_len: int, lora: LoraConfig | None = None,
                   causal: bool = True) -> TrainingFlops:
    """FLOPs per token of forward + backward over blocks of `seq_len` tokens (see the module doc).
    `lora` None is full fine-tuning."""
    count = _Count()
    h_grad = lora is None  # a trainable embedding: the residual stream needs gradients from the start
    for index in range(shape.layers):
        window = shape.sliding_window if index in shape.sliding_layers else None
        matmul = 2 * shape.heads * shape.head_dim * attended_keys(seq_len, window, causal)
        h_grad = count.block(shape, matmul, h_grad, lora, sparse=index in shape.sparse_layers)
    count.linear("lm_head", shape.hidden, shape.vocab, h_grad, lora)
    return TrainingFlops(count.forward, count.input_grads, count.weight_grads)


def attended_keys(seq_len: int, window: int | None, causal: bool = True) -> float:
    """Keys a query attends to, on average over a block of `seq_len`: all of them (not causal),
    (seq_len + 1) / 2 (causal), or at most `window` each (a sliding window: query q sees
    min(q + 1, window) keys)."""
    if not causal:
        return float(seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization: the fraction of the device's peak the training FLOPs reach."""
    if not peak_flops or tokens_per_s_per_device <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token / peak_flops


# Dense (no sparsity) peak TFLOPS per GPU from the vendors' datasheets: (name pattern, bf16, tf32,
# fp32). First match wins, so the variants come before the plain name; A10G takes the A10's figures.
PEAK_TFLOPS: list[tuple[str, float, float, float]] = [
    (r"H100.*(PCIe|HBM2e)", 756.0, 378.0, 51.2),
    (r"H100.*NVL", 835.5, 417.5, 60.0),
    (r"H200.*NVL", 835.5, 417.5, 60.0),
    (r"GH200|H100|H200", 989.4, 494.7, 66.9),
    (r"H20\b", 148.0, 74.0, 44.0),
    (r"A100", 312.0, 156.0, 19.5),
    (r"A10G?\b", 125.0, 62.5, 31.2),
    (r"L40S", 362.1, 183.0, 91.6),
    (r"L40\b", 181.0, 90.5, 90.5),
    (r"L4\b", 121.0, 60.0, 30.3),
    (r"MI300X", 1307.4, 653.7, 163.4),
]


def peak_tflops(device_name: str, dtype: str, tf32: bool = False) -> float | None:
    """The table's dense peak for `device_name` (as torch.cuda.get_device_name() gives it) computing
    in `dtype` ("bfloat16" or "float32"; `tf32`: float32 matmuls on TF32 tensor cores)."""
    for pattern, bf16, tf32_peak, fp32 in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return bf16 if dtype == "bfloat16" else tf32_peak if tf32 else fp32
    return None


def device_peak_flops(device: str, dtype: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of this worker's device: the override if given, the table on a known GPU, else
    None (a CPU, or a GPU missing from the table: no MFU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    peak = peak_tflops(torch.cuda.get_device_name(), dtype, tf32)
    return peak * 1e12 if peak is not None else None
