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


def test_shape_comes_from_the_spec():
    spec = SPEC.replace(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, norm_eps=1e-5,
                        rope_theta=500000.0)
    stage = build_body_stage(spec, 1)
    sd = stage.state_dict()
    assert sd["blocks.0.attn.q.weight"].shape == (64, 64)
    assert sd["blocks.0.attn.k.weight"].shape == sd["blocks.0.attn.v.weight"].shape == (2 * 16, 64)
    assert sd["blocks.0.mlp.w1.weight"].shape == (96, 64) and sd["blocks.0.mlp.w2.weight"].shape == (64, 96)
    assert stage.blocks[0].norm1.eps == stage.blocks[0].norm2.eps == build_head(spec).norm.eps == 1e-5
    assert stage.rope_theta == 500000.0
    # defaults: LLaMa's MLP width and plain multi-head attention
    default = build_body_stage(SPEC, 1).state_dict()
    assert default["blocks.0.mlp.w1.weight"].shape == (SPEC.mlp_hidden, SPEC.hidden_size) == (96, 32)
    assert default["blocks.0.attn.k.weight"].shape == (SPEC.hidden_size, SPEC.hidden_size)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with K key/value heads is multi-head attention whose key/value heads repeat in groups of H // K."""
    gqa_spec = SPEC.replace(hidden_size=64, num_heads=4, num_kv_heads=2)
    mha_spec = gqa_spec.replace(num_kv_heads=0)
    gqa = build_body_stage(gqa_spec, 1)
    state = gqa.state_dict()
    for name in ("blocks.0.attn.k.weight", "blocks.0.attn.v.weight"):
        state[name] = state[name].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha = BodyStage(mha_spec)
    mha.load_state_dict(state)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-6)


def test_full_model_from_states_holds_the_tensors():
    model = FullModel(SPEC)
    head, stages = model.head.state_dict(), [stage.state_dict() for stage in model.stages]
    rebuilt = FullModel.from_states(SPEC, head, stages)
    assert rebuilt.head.embedding.weight.data_ptr() == head["embedding.weight"].data_ptr()  # no copy
    x = tokens(length=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="lm_head"):
        FullModel.from_states(SPEC, {k: v for k, v in head.items() if k != "lm_head.weight"}, stages)
    with pytest.raises(ValueError, match="3 body stages"):
        FullModel.from_states(SPEC, head, stages[:2])
