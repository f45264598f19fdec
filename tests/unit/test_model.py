import pytest
import torch

from cfnode.config import RunSpec
from cfnode.model import (
    BodyStage,
    FullModel,
    HeadModule,
    build_body_stage,
    build_head,
    count_parameters,
    rotary_tables,
)

SPEC = RunSpec(num_stages=3, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)


def tokens(batch: int = 2, length: int = SPEC.seq_len, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_stages_composed_equal_full_model():
    head = build_head(SPEC)
    stages = [build_body_stage(SPEC, i) for i in range(1, SPEC.num_stages + 1)]
    model = FullModel(SPEC)
    x = tokens()
    with torch.no_grad():
        hidden = head.embed(x)
        for stage in stages:
            hidden = stage(hidden)
        composed = head.logits(hidden)
        full = model(x)
    assert full.shape == (2, SPEC.seq_len, SPEC.vocab_size)
    torch.testing.assert_close(composed, full, rtol=0, atol=0)
    torch.testing.assert_close(head.loss(hidden, x), model.loss(x, x), rtol=0, atol=0)


def test_shorter_sequences_work():
    model = FullModel(SPEC)
    with torch.no_grad():
        assert model(tokens(length=5)).shape == (2, 5, SPEC.vocab_size)


def test_build_body_stage_is_deterministic_and_stage_dependent():
    a, b = build_body_stage(SPEC, 2).state_dict(), build_body_stage(SPEC, 2).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = build_body_stage(SPEC, 1).state_dict()
    assert not torch.equal(a["blocks.0.attn.q.weight"], other["blocks.0.attn.q.weight"])
    reseeded = build_body_stage(SPEC.replace(seed=1), 2).state_dict()
    assert not torch.equal(a["blocks.0.attn.q.weight"], reseeded["blocks.0.attn.q.weight"])


def test_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    build_body_stage(SPEC, 1)
    build_head(SPEC)
    assert torch.equal(state, torch.random.get_rng_state())


def test_init_scales():
    sd = build_body_stage(SPEC.replace(hidden_size=128, num_heads=4), 1).state_dict()
    assert torch.equal(sd["blocks.0.norm1.weight"], torch.ones(128))
    assert sd["blocks.0.attn.q.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / (2 * SPEC.num_stages * SPEC.layers_per_stage) ** 0.5
    assert sd["blocks.0.attn.o.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert sd["blocks.0.mlp.w2.weight"].std().item() == pytest.approx(out_std, rel=0.05)


def test_body_stages_share_names_and_shapes():
    shapes = [
        {name: tuple(t.shape) for name, t in build_body_stage(SPEC, i).state_dict().items()}
        for i in range(1, SPEC.num_stages + 1)
    ]
    assert shapes[0] == shapes[1] == shapes[2]
    # So two stages can be averaged into a third.
    averaged = {
        name: (t1 + t3) / 2
        for (name, t1), t3 in zip(
            build_body_stage(SPEC, 1).state_dict().items(), build_body_stage(SPEC, 3).state_dict().values()
        )
    }
    BodyStage(SPEC).load_state_dict(averaged)


def test_output_is_causal():
    model = FullModel(SPEC)
    x = tokens(batch=1)
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 1) % SPEC.vocab_size
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rotary_tables_not_in_state_dict():
    stage = build_body_stage(SPEC, 1)
    assert set(stage.state_dict()) == {name for name, _ in stage.named_parameters()}
    assert not any("cos" in k or "sin" in k or "rot" in k for k in FullModel(SPEC).state_dict())
    cos, sin = rotary_tables(SPEC.seq_len, SPEC.head_dim)
    assert cos.shape == sin.shape == (SPEC.seq_len, SPEC.head_dim // 2)
    torch.testing.assert_close(cos[:5], rotary_tables(5, SPEC.head_dim)[0])


@pytest.mark.parametrize("stage", [0, SPEC.num_stages + 1, -1])
def test_bad_stage_index_raises(stage):
    with pytest.raises(ValueError, match=r"1\.\.3"):
        build_body_stage(SPEC, stage)


def test_head_module_and_parameter_count():
    head = build_head(SPEC)
    assert isinstance(head, HeadModule)
    v, c = SPEC.vocab_size, SPEC.hidden_size
    assert count_parameters(head) == 2 * v * c + c
    assert count_parameters(FullModel(SPEC)) == count_parameters(head) + SPEC.num_stages * count_parameters(
        build_body_stage(SPEC, 1)
    )


def test_adamw_reduces_loss():
    torch.manual_seed(0)
    model = FullModel(SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = tokens(batch=4, length=SPEC.seq_len + 1)
    inputs, targets = x[:, :-1], x[:, 1:]
    first = model.loss(inputs, targets).item()
    assert first == pytest.approx(torch.log(torch.tensor(float(SPEC.vocab_size))).item(), rel=0.05)
    for _ in range(20):
        loss = model.loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.loss(inputs, targets).item() < 0.7 * first
