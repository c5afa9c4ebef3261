"""A model's shape as its config.json states it, for the plan, the memory estimate and the FLOPs count.

Torch-free (the plan is decided on the Airflow side): config.json is read as a dict. Covers the
decoder families the package trains: Llama, Mistral, Qwen2/3, Gemma 3 (text) and the Qwen-style
MoE (Qwen2/3-MoE, Mixtral): GQA, an explicit head_dim, tied embeddings (counted once), per-head q/k
norms (Qwen3, Gemma 3), Gemma's four norms per block, sliding-window layers, and sparse blocks
whose experts are all held (memory) but only `experts_per_token` of which run per token (FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

# Families whose attention normalises each head's queries and keys (a head_dim-sized weight each).
QK_NORM_TYPES = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"}
# Families with a norm before and after both the attention and the MLP (four per block).
FOUR_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
# Families whose config class ties the embedding by default: their config.json may leave the key out
# (transformers writes only values that differ from the class defaults).
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    model_type: str = "llama"
    qk_norm: bool = False
    block_norms: int = 2
    experts: int = 0  # routed experts of a sparse block; 0: a dense model
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0  # Qwen2-MoE's always-on expert (with its sigmoid gate)
    sparse_layers: tuple[int, ...] = ()  # indices of the blocks whose MLP is the experts
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # indices of the blocks that attend within the window

    @classmethod
    def from_config(cls, config: dict, pad_vocab_to: int = 1) -> ModelShape:
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "model_type": config.get("model_type")}  # Gemma 3 4B+: multimodal
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        vocab = -(-config["vocab_size"] // pad_vocab_to) * pad_vocab_to
        kind = str(config.get("model_type") or "llama")
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        sparse: tuple[int, ...] = ()
        if experts:
            step = config.get("decoder_sparse_step") or 1
            dense_only = set(config.get("mlp_only_layers") or ())
            sparse = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        window = config.get("sliding_window")
        if "layer_types" in config and config["layer_types"]:
            sliding = tuple(i for i, t in enumerate(config["layer_types"]) if t == "sliding_attention")
        elif window and config.get("use_sliding_window", True):  # Mistral v0.1: every layer
            sliding = tuple(range(layers))
        else:
            sliding = ()
        return cls(vocab=vocab, hidden=config["hidden_size"], layers=layers, heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate=config["intermediate_size"],
                   tied=bool(config.get("tie_word_embeddings", kind in TIED_BY_DEFAULT)),
                   model_type=kind, qk_norm=kind in QK_NORM_TYPES, block_norms=4 if kind in FOUR_NORM_TYPES else 2,
                   experts=experts, experts_per_token=(config.get("num_experts_per_tok") or 0) if experts else 0,
                   expert_intermediate=(config.get("moe_intermediate_size") or config["intermediate_size"])
                   if experts else 0,
                   shared_expert_intermediate=(config.get("shared_expert_intermediate_size") or 0) if experts else 0,
                   sparse_layers=sparse, sliding_window=window if sliding else None, sliding_layers=sliding)

    @property
    def is_moe(self) -> bool:
        return bool(self.sparse_layers)

    def attention_projections(self) -> dict[str, tuple[int, int]]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}

    @staticmethod
    def mlp_projections(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
        return {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                "down_proj": (intermediate, hidden)}

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one dense decoder block."""
        return {**self.attention_projections(), **self.mlp_projections(self.hidden, self.intermediate)}

    def _norms(self) -> int:
        return self.block_norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def sparse_mlp_params(self, active: bool = False) -> int:
        """A sparse block's MLP: the router, the experts (all, or the `active` ones of one token)
        and the shared expert with its gate."""
        expert = sum(i * o for i, o in self.mlp_projections(self.hidden, self.expert_intermediate).values())
        shared = sum(i * o for i, o in self.mlp_projections(self.hidden, self.shared_expert_intermediate).values())
        count = self.experts_per_token if active else self.experts
        return self.hidden * self.experts + count * expert + shared + (self.hidden if shared else 0)

    def layer_params(self, index: int, active: bool = False) -> int:
        attention = sum(i * o for i, o in self.attention_projections().values())
        if index in self.sparse_layers:
            return attention + self.sparse_mlp_params(active) + self._norms()
        dense = sum(i * o for i, o in self.mlp_projections(self.hidden, self.intermediate).values())
        return attention + dense + self._norms()

    def block_params(self) -> int:
        """The largest block (what FSDP gathers at once: a sparse block holds every expert)."""
        return max(self.layer_params(i) for i in range(self.layers))

    def blocks_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.layers))

    def params(self) -> int:
        """Every parameter (what memory holds): all experts, a tied embedding once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.blocks_params() + embeddings + self.hidden

    def active_params(self) -> int:
        """The parameters one token runs through: only its experts in a sparse block."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return sum(self.layer_params(i, active=True) for i in range(self.layers)) + embeddings + self.hidden

    def mlp_width(self) -> int:
        """Intermediate features one token computes in an MLP (its experts' in a sparse model)."""
        if self.is_moe:
            return self.experts_per_token * self.expert_intermediate + self.shared_expert_intermediate
        return self.intermediate


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """Adapter parameters: attention projections in every block, MLP projections in dense blocks
    (the experts of a sparse block are 3-D parameters, not the linear layers LoRA wraps)."""
    total = 0
    for index in range(shape.layers):
        layer = shape.attention_projections() if index in shape.sparse_layers else shape.projections()
        total += sum(rank * (i + o) for name, (i, o) in layer.items() if name in targets)
    return total
