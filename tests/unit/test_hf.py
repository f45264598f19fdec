import hashlib
import json
import logging
import struct

import pytest
import torch

from cfnode.config import ConfigError, RunSpec
from cfnode.hf import (
    dir_digests,
    from_hf_state,
    llama_config,
    load_part,
    part_digest,
    part_states,
    read_hf_dir,
    spec_fields_from_llama_config,
    to_hf_state,
    write_hf_dir,
)
from cfnode.model import FullModel
from cfnode.model.generate import generate

transformers = pytest.importorskip("transformers")

SPEC = RunSpec(num_stages=2, layers_per_stage=2, hidden_size=64, num_heads=4, seq_len=32)
GQA = SPEC.replace(num_kv_heads=2, rope_theta=500000.0, intermediate_size=96, norm_eps=1e-5)
SPECS = pytest.mark.parametrize("spec", [SPEC, GQA], ids=["mha", "gqa"])


def random_model(spec: RunSpec, seed: int = 0) -> FullModel:
    """Weights far from the init (norm gains too), so a wrong mapping shows in the logits."""
    model = FullModel(spec).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, offset = (0.1, 1.0) if "norm" in name else (0.15, 0.0)
            p.copy_(offset + scale * torch.randn(p.shape, generator=generator))
    return model


def states(model: FullModel) -> tuple[dict, list[dict]]:
    return model.head.state_dict(), [stage.state_dict() for stage in model.stages]


def tokens(length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (batch, length), generator=torch.Generator().manual_seed(5))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_random_llama(tmp_path, tie: bool = False, **config):
    """A transformers Llama with random weights, saved as safetensors; returns (model, directory)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie, **config,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    directory = tmp_path / "hf"
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@SPECS
def test_export_loads_in_transformers_with_equal_logits(spec, tmp_path):
    model = random_model(spec)
    head, stages = states(model)
    seen = []
    write_hf_dir(tmp_path, spec, head, stages, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == 3 + 9 * spec.num_stages * spec.layers_per_stage
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    cfg = theirs.config
    assert cfg.num_key_value_heads == spec.kv_heads and cfg.intermediate_size == spec.mlp_hidden
    assert cfg.rope_parameters["rope_theta"] == spec.rope_theta and cfg.rms_norm_eps == spec.norm_eps
    assert cfg.tie_word_embeddings is False and cfg.bos_token_id is None
    assert cfg.cfnode["num_stages"] == spec.num_stages
    x = tokens()
    with torch.no_grad():
        ours = model(x)
    diff = max_diff(hf_logits(theirs, x), ours)
    assert diff < 1e-5, f"max abs diff {diff}"
    assert ours.abs().max() > 1
    # generation_config.json is valid and transformers' greedy decoding agrees with cfnode's cached one
    generated = theirs.generate(x[:1, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours_greedy = generate(model.head, model.body_stages(), x[0, :6], 12, temperature=0)
    assert generated[0, 6:].tolist() == ours_greedy.tolist()
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert generation.do_sample and generation.max_length == spec.seq_len


def test_hf_state_names_and_shapes_match_transformers():
    head, stages = states(random_model(GQA))
    ours = to_hf_state(GQA, head, stages)
    fields = llama_config(GQA)
    fields = {k: v for k, v in fields.items() if k not in ("cfnode", "torch_dtype", "rope_scaling", "rope_theta")}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).state_dict()
    assert {name: tuple(t.shape) for name, t in ours.items()} == {name: tuple(t.shape) for name, t in reference.items()}


@SPECS
def test_round_trip_is_bitwise(spec):
    head, stages = states(random_model(spec))
    back_head, back_stages = from_hf_state(spec, to_hf_state(spec, head, stages))
    for before, after in zip([head, *stages], [back_head, *back_stages]):
        assert before.keys() == after.keys()
        for name in before:
            assert after[name].dtype == torch.float32
            assert torch.equal(before[name], after[name]), name


def test_spec_fields_round_trip_through_config():
    for spec in (SPEC, GQA):
        fields = spec_fields_from_llama_config(json.loads(json.dumps(llama_config(spec))))
        assert RunSpec(**fields, seq_len=spec.seq_len) == spec
    fields = spec_fields_from_llama_config(llama_config(SPEC), num_stages=4)
    assert (fields["num_stages"], fields["layers_per_stage"]) == (4, 1)


def test_transformers_checkpoint_gives_equal_logits_in_cfnode(tmp_path):
    theirs, directory = hf_random_llama(tmp_path)
    config, hf_state = read_hf_dir(directory)
    fields = spec_fields_from_llama_config(config, num_stages=2)
    assert fields["num_kv_heads"] == 2 and fields["intermediate_size"] == 96 and fields["layers_per_stage"] == 2
    spec = RunSpec(**fields, seq_len=64)
    parts = part_states(spec, hf_state)
    ours = FullModel.from_states(spec, parts[0], parts[1:]).eval()
    x = tokens()
    with torch.no_grad():
        diff = max_diff(ours(x), hf_logits(theirs, x))
    assert diff < 1e-5, f"max abs diff {diff}"
    # each part alone, read straight from the files, is the same
    spec = spec.replace(init_digests=dir_digests(directory, spec))
    assert spec.init_digests == tuple(part_digest(p) for p in parts)
    for index, part in enumerate(parts):
        loaded = load_part(directory, spec, index)
        assert loaded.keys() == part.keys() and all(torch.equal(loaded[k], part[k]) for k in part)


def test_sharded_checkpoint_reads(tmp_path):
    theirs, directory = hf_random_llama(tmp_path)
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    config, hf_state = read_hf_dir(sharded)
    spec = RunSpec(**spec_fields_from_llama_config(config, num_stages=4), seq_len=64)
    expected = part_states(spec, read_hf_dir(directory)[1])
    spec = spec.replace(init_digests=tuple(part_digest(p) for p in part_states(spec, hf_state)))
    assert spec.init_digests == tuple(part_digest(p) for p in expected)
    assert torch.equal(load_part(sharded, spec, 3)["blocks.0.attn.k.weight"], expected[3]["blocks.0.attn.k.weight"])


def test_tied_embeddings_load_untied(tmp_path, caplog):
    theirs, directory = hf_random_llama(tmp_path, tie=True)
    config, hf_state = read_hf_dir(directory)
    spec = RunSpec(**spec_fields_from_llama_config(config, num_stages=1), seq_len=64)
    with caplog.at_level(logging.INFO, logger="cfnode"):
        head = load_part(directory, spec.replace(init_digests=dir_digests(directory, spec)), 0)
    assert "untying" in caplog.text
    assert torch.equal(head["lm_head.weight"], head["embedding.weight"])
    assert head["lm_head.weight"].data_ptr() != head["embedding.weight"].data_ptr()  # a copy: they train apart
    parts = part_states(spec, hf_state)
    ours = FullModel.from_states(spec, parts[0], parts[1:]).eval()
    x = tokens()
    with torch.no_grad():
        diff = max_diff(ours(x), hf_logits(theirs, x))
    assert diff < 1e-5, f"max abs diff {diff}"
    # exporting it again writes an untied checkpoint
    write_hf_dir(tmp_path / "again", spec, parts[0], parts[1:])
    again_config, again = read_hf_dir(tmp_path / "again")
    assert again_config["tie_word_embeddings"] is False and "lm_head.weight" in again


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unrepresentable_configs_are_refused_by_field(changes, field):
    config = {**llama_config(SPEC), **changes}
    with pytest.raises(ConfigError, match=field):
        spec_fields_from_llama_config(config)


def test_num_stages_needed_without_cfnode_section():
    config = llama_config(SPEC)
    del config["cfnode"]
    with pytest.raises(ConfigError, match="num_stages"):
        spec_fields_from_llama_config(config)
    assert spec_fields_from_llama_config(config, 1)["layers_per_stage"] == 4


def test_part_digest_is_stable_and_sensitive():
    head, _ = states(random_model(SPEC))
    digest = part_digest(head)
    shuffled = {name: head[name].clone() for name in reversed(list(head))}
    assert part_digest(shuffled) == digest
    changed = {name: t.clone() for name, t in head.items()}
    changed["norm.weight"][3] += 1e-3
    assert part_digest(changed) != digest
    renamed = {("x." + name if name == "norm.weight" else name): t for name, t in head.items()}
    assert part_digest(renamed) != digest
    # the documented format, computed independently
    state = {"b": torch.tensor([[1.0, 2.0]]), "a": torch.tensor([0.5])}
    expected = hashlib.sha256(
        b"cfnode-part-digest-v1\n" + b"a\tfloat32\t1\n" + struct.pack("<f", 0.5)
        + b"b\tfloat32\t1,2\n" + struct.pack("<2f", 1.0, 2.0)
    ).hexdigest()
    assert part_digest(state) == expected


def test_load_part_checks_the_digest_and_the_shape(tmp_path):
    head, stages = states(random_model(SPEC))
    write_hf_dir(tmp_path, SPEC, head, stages)
    digests = tuple(part_digest(p) for p in [head, *stages])
    assert dir_digests(tmp_path, SPEC) == digests
    spec = SPEC.replace(init_digests=digests)
    stage2 = load_part(tmp_path, spec, 2)
    assert all(torch.equal(stage2[k], stages[1][k]) for k in stages[1])
    wrong = spec.replace(init_digests=(digests[0], digests[2], digests[2]))
    with pytest.raises(ConfigError, match=f"part 1.*{digests[1]}.*{digests[2]}"):
        load_part(tmp_path, wrong, 1)
    with pytest.raises(ConfigError, match="init_digests"):
        load_part(tmp_path, SPEC, 1)
    with pytest.raises(ConfigError, match="hidden_size"):
        load_part(tmp_path, spec.replace(hidden_size=32, num_heads=2), 1)


def test_directories_without_safetensors_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama_config(SPEC)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        read_hf_dir(tmp_path)


def test_unknown_tensors_are_refused():
    head, stages = states(random_model(SPEC))
    hf_state = to_hf_state(SPEC, head, stages)
    hf_state["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="layers.9"):
        from_hf_state(SPEC, hf_state)


def test_sampling_refuses_a_tokenizer_other_than_the_one_the_export_records(tmp_path):
    from cfnode.data.tokenizer import write_hf_tokenizer
    from cfnode.hf.load import sample_text

    spec = RunSpec(num_stages=1, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)
    model = FullModel(spec)
    write_hf_dir(tmp_path, spec, model.head.state_dict(), [s.state_dict() for s in model.stages])
    write_hf_tokenizer(spec, None, tmp_path)  # the byte tokenizer, as a tokenizers file
    assert sample_text(tmp_path, "ab", 4, seed=1) == sample_text(tmp_path, "ab", 4, seed=1)
    edited = json.loads((tmp_path / "tokenizer.json").read_text())
    edited["added_tokens"] = [{"id": 256, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
                               "normalized": False, "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match="not the tokenizer the model was trained with"):
        sample_text(tmp_path, "ab", 4)
