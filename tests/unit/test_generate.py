import pytest
import torch

from cfnode.config import RunSpec
from cfnode.model import FullModel
from cfnode.model.generate import generate, logits_cached, new_caches

SPEC = RunSpec(num_stages=2, layers_per_stage=2, hidden_size=64, num_heads=4, seq_len=32)
GQA = SPEC.replace(num_kv_heads=2, rope_theta=500000.0, intermediate_size=96, norm_eps=1e-5)


def random_model(spec: RunSpec, seed: int = 0) -> FullModel:
    """A model with weights large enough that greedy decoding does not just repeat one token."""
    model = FullModel(spec.replace(seed=seed)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))
    return model


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def greedy_uncached(model: FullModel, tokens: torch.Tensor, steps: int, context: int) -> list[int]:
    """Recompute the whole window every step; the same sliding rule as generate() (module docstring)."""
    keep = max(1, context // 2)
    window, out = tokens[-context:].tolist(), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([window]))[0, -1].argmax())
            out.append(token)
            window = (window + [token])[-keep:] if len(window) >= context else window + [token]
    return out


@pytest.mark.parametrize("spec", [SPEC, GQA], ids=["mha", "gqa"])
def test_cached_logits_equal_uncached(spec):
    model = random_model(spec)
    tokens = prompt(20)[None]  # (1, 20)
    with torch.no_grad():
        full = model(tokens)  # (1, 20, V)
        caches = new_caches(model.body_stages())
        pieces = [
            logits_cached(model.head, model.body_stages(), caches, tokens[:, :5]),  # prefill
            logits_cached(model.head, model.body_stages(), caches, tokens[:, 5:9]),  # T > 1 after a past: the mask
        ]
        pieces += [logits_cached(model.head, model.body_stages(), caches, tokens[:, t:t + 1]) for t in range(9, 20)]
    cached = torch.cat(pieces, dim=1)
    assert caches[0].length == caches[1].length == 20
    diff = (cached - full).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"
    assert full.abs().max() > 1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("spec", [SPEC, GQA], ids=["mha", "gqa"])
def test_greedy_matches_recomputing_the_prefix(spec):
    model = random_model(spec)
    p = prompt(6)
    out = generate(model.head, model.body_stages(), p, 20, temperature=0)
    assert out.dtype == torch.long and out.shape == (20,)
    assert out.tolist() == greedy_uncached(model, p, 20, spec.seq_len)
    assert len(set(out.tolist())) > 3  # not a degenerate repetition


def test_context_slides_past_seq_len():
    model = random_model(SPEC)
    p = prompt(SPEC.seq_len + 8)  # longer than the context: its last seq_len tokens are kept
    out = generate(model.head, model.body_stages(), p, 3 * SPEC.seq_len, temperature=0)
    assert out.tolist() == greedy_uncached(model, p, 3 * SPEC.seq_len, SPEC.seq_len)
    short = generate(model.head, model.body_stages(), p, 10, temperature=0, seq_len=8)
    assert short.tolist() == greedy_uncached(model, p, 10, 8)


def test_sampling_is_reproducible_per_seed():
    model = random_model(SPEC)
    p = prompt(4)

    def sample(seed: int, **kwargs) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model.head, model.body_stages(), p, 24, generator=generator, **kwargs).tolist()

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_k=5) == sample(0, top_k=5)
    greedy = generate(model.head, model.body_stages(), p, 24, temperature=0).tolist()
    assert sample(3, top_k=1) == greedy
    assert sample(3, temperature=1e-4) == greedy  # a tiny temperature is (almost surely) greedy


def test_stop_token_ends_generation_and_is_included():
    model = random_model(SPEC)
    p = prompt(4)
    greedy = generate(model.head, model.body_stages(), p, 20, temperature=0).tolist()
    stop = greedy[5]
    first = greedy.index(stop)
    out = generate(model.head, model.body_stages(), p, 20, temperature=0, stop_token=stop)
    assert out.tolist() == greedy[: first + 1]


def test_generate_arguments():
    model = random_model(SPEC)
    head, stages = model.head, model.body_stages()
    assert generate(head, stages, prompt(3), 0).shape == (0,)
    with pytest.raises(ValueError, match="prompt"):
        generate(head, stages, torch.zeros(0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt"):
        generate(head, stages, prompt(4)[None], 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(head, stages, prompt(4), 5, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(head, stages, prompt(4), 5, top_k=0)


def test_forward_cached_refuses_a_gap():
    model = random_model(SPEC)
    stage = model.body_stages()[0]
    cache = stage.new_cache()
    with torch.no_grad():
        stage.forward_cached(torch.randn(1, 3, SPEC.hidden_size), cache, start=0)
        with pytest.raises(ValueError, match="start position 5"):
            stage.forward_cached(torch.randn(1, 1, SPEC.hidden_size), cache, start=5)
        out = stage.forward_cached(torch.randn(1, 1, SPEC.hidden_size), cache, start=3)
    assert out.shape == (1, 1, SPEC.hidden_size) and cache.length == 4
