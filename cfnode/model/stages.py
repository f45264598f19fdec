"""The model cut into pipeline stages.

The trainer holds the HeadModule (token embedding, final norm, LM head: the paper's "stage 0"); peers hold body
stages 1..S, each `layers_per_stage` identical blocks. Every stage's fresh weights derive from (seed, stage) alone, so
any node can rebuild any stage without talking to anyone, and all body stages share parameter names and shapes so
neighbours' weights can be averaged into a lost stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfnode.config import RunSpec
from cfnode.model.layers import Block, KVCache, RMSNorm, rotary_tables

INIT_STD = 0.02
# Parameters that write into the residual stream; GPT-2 scales them by 1/sqrt(2 * layers) so the stream's
# variance does not grow with depth.
RESIDUAL_OUTPUTS = ("attn.o.weight", "mlp.w2.weight")


class StageCache:
    """A body stage's KV cache for generation: one KVCache per block, all holding the same positions."""

    def __init__(self, num_blocks: int) -> None:
        self.layers = [KVCache() for _ in range(num_blocks)]

    @property
    def length(self) -> int:
        """Positions held (0 for a fresh cache)."""
        return self.layers[0].length if self.layers else 0


class BodyStage(nn.Module):
    """`spec.layers_per_stage` transformer blocks: hidden states in, hidden states out."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.rope_theta = spec.rope_theta
        self.blocks = nn.ModuleList([
            Block(spec.hidden_size, spec.num_heads, spec.kv_heads, spec.mlp_hidden, spec.norm_eps)
            for _ in range(spec.layers_per_stage)
        ])

    def forward(self, hidden: Tensor) -> Tensor:
        # Rotary tables for the actual T; recomputing them is cheap and keeps them out of the state_dict.
        cos, sin = rotary_tables(hidden.shape[1], self.head_dim, self.rope_theta, device=hidden.device)  # (T, D/2)
        for block in self.blocks:
            hidden = block(hidden, cos, sin)  # (B, T, C)
        return hidden

    def new_cache(self) -> StageCache:
        return StageCache(len(self.blocks))

    def forward_cached(self, hidden: Tensor, cache: StageCache, start: int | None = None) -> Tensor:
        """forward() of hidden (B, T, C) at absolute positions start..start+T-1, attending to the start positions
        already in cache as well, and adding the new ones to it. Prefill a prompt with a fresh cache, then feed one
        position at a time. start defaults to cache.length; any other value is an error (it would skip or repeat
        positions)."""
        past = cache.length
        if start is not None and start != past:
            raise ValueError(f"start position {start} does not follow the {past} positions in the cache")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.layers)} layers, the stage {len(self.blocks)} blocks")
        cos, sin = rotary_tables(
            hidden.shape[1], self.head_dim, self.rope_theta, device=hidden.device, start=past
        )  # (T, D/2) each
        for block, layer_cache in zip(self.blocks, cache.layers):
            hidden = block.forward_cached(hidden, cos, sin, layer_cache)  # (B, T, C)
        return hidden


class HeadModule(nn.Module):
    """Token embedding at the start of the pipeline, final norm and LM head at its end (weights not tied)."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__()
        self.seq_len = spec.seq_len  # the context it was trained for: generate() never feeds it more
        self.embedding = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embedding(tokens)  # (B, T) -> (B, T, C)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))  # (B, T, C) -> (B, T, V)

    def loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross entropy of hidden (B, T, C) against targets (B, T)."""
        logits = self.logits(hidden)  # (B, T, V)
        # Cross entropy in float32: a bf16 softmax over the vocabulary is too coarse.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _stage_seed(seed: int, stage: int) -> int:
    """A 63-bit generator seed from (seed, stage); hashing keeps nearby pairs far apart and any int seed valid."""
    digest = hashlib.sha256(f"cfnode-init:{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def _init_weights(module: nn.Module, generator: torch.Generator, total_layers: int) -> None:
    """Initialise every parameter of module in place, in named_modules order, from generator alone."""
    out_std = INIT_STD / math.sqrt(2 * total_layers)
    done: set[str] = set()
    for prefix, sub in module.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            std = out_std if name.endswith(RESIDUAL_OUTPUTS) else INIT_STD
            sub.weight.normal_(0.0, std, generator=generator)
        elif isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
        else:
            continue
        done.add(name)
    # A new parameter kind must get an explicit rule here, not the garbage that to_empty() leaves.
    missing = [name for name, _ in module.named_parameters() if name not in done]
    if missing:
        raise TypeError(f"no init rule for parameter(s) {', '.join(missing)}")


def _build(module_type: type[nn.Module], spec: RunSpec, stage: int) -> nn.Module:
    # Build on the meta device so the default nn.Linear init (which draws from the global RNG) never runs;
    # _init_weights then fills every parameter from a local generator.
    with torch.device("meta"):
        module = module_type(spec)
    module = module.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(_stage_seed(spec.seed, stage))
    _init_weights(module, generator, total_layers=spec.num_stages * spec.layers_per_stage)
    return module


def build_body_stage(spec: RunSpec, stage: int) -> BodyStage:
    """Fresh weights of body stage `stage` (1..spec.num_stages), a function of (spec.seed, stage) only."""
    if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= spec.num_stages:
        raise ValueError(f"body stage index must be an integer in 1..{spec.num_stages}, got {stage!r}")
    module = _build(BodyStage, spec, stage)
    assert isinstance(module, BodyStage)
    return module


def build_head(spec: RunSpec) -> HeadModule:
    """Fresh weights of the trainer's embedding, final norm and LM head, a function of (spec.seed, 0) only."""
    module = _build(HeadModule, spec, 0)
    assert isinstance(module, HeadModule)
    return module


def _from_state(module_type: type[nn.Module], spec: RunSpec, state: Mapping[str, Tensor]) -> nn.Module:
    with torch.device("meta"):
        module = module_type(spec)
    # assign=True takes the tensors over instead of filling freshly allocated ones: one copy of a large model, not
    # two. load_state_dict is strict, so a missing, extra or misshapen tensor is an error naming it.
    module.load_state_dict(dict(state), strict=True, assign=True)
    return module


def head_from_state(spec: RunSpec, state: Mapping[str, Tensor]) -> HeadModule:
    """A HeadModule holding state's tensors (not copies): embedding.weight, norm.weight, lm_head.weight."""
    module = _from_state(HeadModule, spec, state)
    assert isinstance(module, HeadModule)
    return module


def body_stage_from_state(spec: RunSpec, state: Mapping[str, Tensor]) -> BodyStage:
    """A BodyStage holding state's tensors (not copies): blocks.{j}.... as in BodyStage.state_dict()."""
    module = _from_state(BodyStage, spec, state)
    assert isinstance(module, BodyStage)
    return module


class FullModel(nn.Module):
    """The whole pipeline in one process: head.embed -> stages 1..S -> head.logits, with the same weights."""

    def __init__(
        self, spec: RunSpec, head: HeadModule | None = None, stages: Sequence[BodyStage] | None = None
    ) -> None:
        """Fresh weights from spec.seed, or the given head and body stages (all spec.num_stages of them)."""
        super().__init__()
        self.spec = spec
        self.head = head if head is not None else build_head(spec)
        if stages is None:
            stages = [build_body_stage(spec, i) for i in range(1, spec.num_stages + 1)]
        if len(stages) != spec.num_stages:
            raise ValueError(f"the spec has {spec.num_stages} body stages, got {len(stages)}")
        self.stages = nn.ModuleList(stages)

    @classmethod
    def from_states(
        cls, spec: RunSpec, head_state: Mapping[str, Tensor], stage_states: Sequence[Mapping[str, Tensor]]
    ) -> FullModel:
        """The model holding these tensors (not copies): head_state as HeadModule.state_dict(), stage_states[s - 1]
        body stage s's."""
        head = head_from_state(spec, head_state)
        return cls(spec, head, [body_stage_from_state(spec, state) for state in stage_states])

    def body_stages(self) -> list[BodyStage]:
        """The body stages 1..S as a typed list (for generate())."""
        return [stage for stage in self.stages if isinstance(stage, BodyStage)]

    def hidden(self, tokens: Tensor) -> Tensor:
        hidden = self.head.embed(tokens)  # (B, T, C)
        for stage in self.stages:
            hidden = stage(hidden)  # (B, T, C)
        return hidden

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head.logits(self.hidden(tokens))  # (B, T) -> (B, T, V)

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        return self.head.loss(self.hidden(tokens), targets)  # scalar


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
