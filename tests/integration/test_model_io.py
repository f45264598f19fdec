"""The swarm's model, out and in.

Out: a swarm trained with a BPE tokenizer is exported from its live peers (and again from the state files they
saved) to a Hugging Face Llama directory; transformers loads it, and its logits equal cfnode's own forward on the
stages' live weights; its tokenizer gives cfnode's tokens; `cfnode generate` samples from it reproducibly.
In: a run started from a transformers checkpoint takes its shape from it, its first loss is transformers' loss on the
same batch, and after training its export loads in transformers again with cfnode's logits.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from cfnode.config import RunSpec
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.data.corpus import DataError
from cfnode.data.tokenizer import FileTokenizer, file_sha256, train_bpe
from cfnode.hf.checkpoint import part_states
from cfnode.hf.export import collect_offline, export_model
from cfnode.hf.load import sample_text
from cfnode.launcher import cfnode_command
from cfnode.model import FullModel
from cfnode.node.runtime import connect
from cfnode.node.stage_state import load_state_file, model_state
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.service import StageClient
from tests.integration.harness import TINY_SPEC, Swarm, network, read_events

pytestmark = pytest.mark.integration

# float32 on the wire: the first-step loss is compared with transformers' to 1e-4.
SPEC = TINY_SPEC.replace(num_stages=2, layers_per_stage=1, wire_dtype="float32", refit_cache=0)
STEPS = 3

WORDS = ("the cat dog bird girl boy tree house sun moon ran saw found liked made big small happy sad red blue "
         "little very and then because so she he they it was is had said friend park ball cake").split()


def story_text(seed: int = 0, sentences: int = 3000) -> str:
    """Deterministic English-like text with some non-ASCII words, enough for a 64-token window's train/val split."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        if rng.random() < 0.05:
            words.append(rng.choice(["café", "naïve", "Grüße", "日本", "🙂"]))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def cfnode(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cfnode_command(*args), capture_output=True, text=True, timeout=timeout)


async def live_weights(maddr: str, spec: RunSpec) -> dict[int, dict[str, torch.Tensor]]:
    """stage -> the weights of one of its live peers, downloaded the way a newcomer copies them."""
    async with connect(network(maddr)) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        stage_map = await read_stage_map(dht, spec)
        out = {}
        for stage, peers in stage_map.items():
            state = await client.download_state(peers[0].peer_id, stage, timeout=60, weights_only=True)
            out[stage] = model_state(state)
        await client.close()
        return out


def assert_same_logits(model_dir: Path, spec: RunSpec, head: dict, stages: list[dict], tokens: torch.Tensor) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = FullModel.from_states(spec, head, stages).eval()
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(tokens).logits
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"transformers' logits differ from cfnode's by {diff:.3g}"


def test_export_from_a_live_swarm_loads_in_transformers(swarm: Swarm, tmp_path: Path) -> None:
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_text())
    tokenizer_file = tmp_path / "tokenizer.json"
    train_bpe(corpus, 320, tokenizer_file)
    swarm.spec = SPEC
    swarm.start_bootstrap("--tokenizer", str(tokenizer_file))
    peer_states = {s: tmp_path / f"stage{s}.state" for s in (1, 2)}
    peers = {s: swarm.start_peer(s, "--state", str(peer_states[s]), "--state-every", "1") for s in (1, 2)}
    swarm.wait_online({1: 1, 2: 1})
    trainer_state = tmp_path / "trainer.state"
    trainer, jsonl = swarm.start_trainer(STEPS, "--data", str(corpus), "--tokenizer", str(tokenizer_file),
                                         "--state", str(trainer_state))
    assert trainer.process.wait(240) == 0, swarm.log(trainer)
    assert [e["step"] for e in read_events(jsonl) if e["event"] == "step"] == [1, 2, 3]

    out = tmp_path / "model"
    done = cfnode("export", "--initial-peers", swarm.maddr, "--trainer-state", str(trainer_state),
                  "--tokenizer", str(tokenizer_file), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported step 3" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 2, 320)

    # The export is the live swarm's model: transformers computes cfnode's logits from it.
    stages = asyncio.run(live_weights(swarm.maddr, swarm.spec))
    head = model_state(load_state_file(trainer_state, SPEC.run_id))
    ours = FileTokenizer(tokenizer_file)
    text = "The little cat saw a big café. 🙂"
    tokens = ours.encode(text)[None]
    assert_same_logits(out, swarm.spec.replace(tokenizer=f"sha256:{file_sha256(tokenizer_file)}", vocab_size=320),
                       head, [stages[1], stages[2]], tokens)

    # Its tokenizer is the run's: the same ids, and text round-trips.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tokens[0].tolist()
    assert hf_tokenizer.decode(ids) == text

    # Offline, from the state files the peers and the trainer saved: the same weights, bit for bit.
    offline = tmp_path / "offline"
    done = cfnode("export", "--from-state", str(trainer_state), "--from-state", str(peer_states[1]),
                  "--from-state", str(peer_states[2]), "--tokenizer", str(tokenizer_file), "--out", str(offline))
    assert done.returncode == 0, done.stderr
    live, saved = load_file(out / "model.safetensors"), load_file(offline / "model.safetensors")
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in live)

    # Another tokenizer than the run's is refused, and says why; nothing is written.
    other = tmp_path / "other.json"
    train_bpe(corpus, 300, other)
    parts = collect_offline([str(trainer_state), str(peer_states[1]), str(peer_states[2])])
    with pytest.raises(DataError, match="sha256"):
        export_model(parts, tmp_path / "no", str(other))
    assert not (tmp_path / "no").exists()

    # Sampling from the export is reproducible for a seed (`cfnode generate` runs this; the demo test runs the CLI).
    samples = [sample_text(out, "The cat", max_new_tokens=20, seed=seed) for seed in (7, 7)]
    assert samples[0] == samples[1] and len(samples[0]) > 0

    # A swarm with a lost stage holds no whole model: the export says which stage.
    swarm.kill(peers[2])
    done = cfnode("export", "--initial-peers", swarm.maddr, "--trainer-state", str(trainer_state),
                  "--tokenizer", str(tokenizer_file), "--out", str(tmp_path / "partial"))
    assert done.returncode == 1 and "stage(s) 2" in done.stderr, done.stderr


def small_llama(path: Path) -> transformers.LlamaForCausalLM:
    """A random transformers Llama with grouped-query attention, another rope base and norm epsilon."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                      rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_a_run_started_from_a_transformers_checkpoint(swarm: Swarm, tmp_path: Path) -> None:
    checkpoint = tmp_path / "llama"
    llama = small_llama(checkpoint)
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_text(1))
    swarm.spec = SPEC
    swarm.start_bootstrap("--init-from", str(checkpoint))

    # A peer whose copy of the checkpoint differs from the one the spec pins refuses to serve it.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in checkpoint.iterdir():
        (tampered / file.name).write_bytes(file.read_bytes())
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})
    wrong = swarm.start_peer(1, "--init-from", str(tampered))
    assert wrong.process.wait(120) == 1, swarm.log(wrong)
    assert "stage 1" in swarm.log(wrong) and "digest" in swarm.log(wrong)

    for stage in (1, 2):
        swarm.start_peer(stage, "--init-from", str(checkpoint))
    swarm.wait_online({1: 1, 2: 1})
    trainer, jsonl = swarm.start_trainer(STEPS, "--data", str(corpus), "--init-from", str(checkpoint),
                                         "--microbatches", "2")
    assert trainer.process.wait(240) == 0, swarm.log(trainer)
    steps = [e for e in read_events(jsonl) if e["event"] == "step"]

    # The swarm's first loss is transformers' loss on the same batch: the run starts from exactly that model.
    dataset = TextDataset(load_corpus(corpus), SPEC.seq_len)
    inputs, targets = dataset.sample_batch(8, batch_generator(0, 1))
    with torch.no_grad():
        losses = [F.cross_entropy(llama(x).logits.flatten(0, 1), y.flatten()).item()
                  for x, y in zip(inputs.chunk(2), targets.chunk(2))]
    expected = sum(losses) / len(losses)
    assert steps[0]["loss"] == pytest.approx(expected, abs=1e-4), (steps[0]["loss"], expected)
    assert steps[-1]["step"] == STEPS

    out = tmp_path / "trained"
    done = cfnode("export", "--initial-peers", swarm.maddr, "--out", str(out))
    assert done.returncode == 0, done.stderr
    stages = asyncio.run(live_weights(swarm.maddr, swarm.spec))
    spec = swarm.spec.replace(vocab_size=256, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
                              rope_theta=500000.0, norm_eps=1e-5, layers_per_stage=1)
    exported = load_file(out / "model.safetensors")
    assert not torch.equal(exported["model.layers.0.mlp.down_proj.weight"],
                           llama.state_dict()["model.layers.0.mlp.down_proj.weight"]), "the export is not trained"
    head = part_states(spec, exported)[0]
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    assert_same_logits(out, spec, head, [stages[1], stages[2]], tokens)
