"""The `cfnode` command line: parse flags into configs, then run one role."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cfnode import __version__
from cfnode.config import RECOVERY_MODES, ConfigError, JoinConfig, NetworkConfig, RunSpec, TrainConfig
from cfnode.data import commands as data_commands

# Errors a user can cause (bad input, an unreachable swarm): one line and a non-zero exit, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError, RuntimeError, TimeoutError)


class CfnodeGroup(click.Group):
    """Reports usage errors as one line: `cfnode <command>: error: <reason>`."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.ClickException as e:
            command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "cfnode"
            click.echo(f"{command}: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)


def _setup_logging(level: str) -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("cfnode").setLevel(level.upper())


def _run(command: str, fn: Callable[[], Any]) -> Any:
    """Run a role; a failure the user can act on becomes one line on stderr and exit status 1."""
    try:
        return fn()
    except KeyboardInterrupt:
        sys.exit(130)
    except USER_ERRORS as e:
        click.echo(f"cfnode {command}: error: {e}", err=True)
        sys.exit(1)


def network_options(fn: Callable) -> Callable:
    options = [
        click.option("--initial-peers", "initial_peers", envvar="CFNODE_INITIAL_PEERS", multiple=True,
                     help="Multiaddr of a peer already in the swarm: the bootstrap's, or with --spec-owner any live "
                          "peer's (`cfnode status` lists some); repeatable. "
                          "Env: CFNODE_INITIAL_PEERS (space-separated)."),
        click.option("--spec-owner", "spec_owners", envvar="CFNODE_SPEC_OWNER", multiple=True, metavar="PEER_ID",
                     help="Peer id trusted to sign the run spec: the bootstrap's (`cfnode status` prints it). With "
                          "it, any live peer of the swarm works as --initial-peers; without it, the run spec must be "
                          "signed by an initial peer, so those must include the bootstrap. Repeatable. "
                          "Env: CFNODE_SPEC_OWNER (space-separated)."),
        click.option("--host", default="127.0.0.1", show_default=True, envvar="CFNODE_HOST",
                     help="Address to listen on (0.0.0.0 for all interfaces)."),
        click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, envvar="CFNODE_PORT",
                     help="TCP port to listen on; 0 picks a free one."),
        click.option("--identity", type=click.Path(dir_okay=False), envvar="CFNODE_IDENTITY",
                     help="Private key file; created if missing. Keeps the peer id across restarts."),
        click.option("--announce-maddr", "announce_maddrs", multiple=True, envvar="CFNODE_ANNOUNCE_MADDRS",
                     help="Multiaddr other peers should dial to reach this one (behind NAT); repeatable."),
        click.option("--announce-host", envvar="CFNODE_ANNOUNCE_HOST",
                     help="Address (or hostname, resolved here) other peers should dial to reach this one; needs a "
                          "fixed --port and announces /ip4/HOST/tcp/PORT. For --host 0.0.0.0, containers, NAT."),
        click.option("--run-id", default="cfnode", show_default=True, envvar="CFNODE_RUN_ID",
                     help="Name of the run; several runs can share one DHT."),
        click.option("--connect-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                     envvar="CFNODE_CONNECT_TIMEOUT", help="Seconds to reach the initial peers and find the run."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                     show_default=True, envvar="CFNODE_LOG_LEVEL"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _network(kw: dict[str, Any], client_mode: bool = False, require_peers: bool = True) -> NetworkConfig:
    peers = tuple(p for item in kw.pop("initial_peers") for p in item.split())
    if require_peers and not peers:
        raise click.UsageError("--initial-peers is required (the bootstrap's multiaddr; env CFNODE_INITIAL_PEERS)")
    announce, announce_host, port = list(kw.pop("announce_maddrs")), kw.pop("announce_host"), kw.pop("port")
    if announce_host:
        from cfnode.node.dht import announce_maddr

        try:
            announce.append(announce_maddr(announce_host, port))
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    owners = tuple(dict.fromkeys(o for item in kw.pop("spec_owners") for o in item.split()))
    _setup_logging(kw.pop("log_level"))
    try:
        return NetworkConfig(
            initial_peers=peers, host=kw.pop("host"), port=port, identity_path=kw.pop("identity"),
            announce_maddrs=tuple(announce), client_mode=client_mode, run_id=kw.pop("run_id"),
            connect_timeout=kw.pop("connect_timeout"), spec_owner_ids=owners,
        )
    except ConfigError as e:  # a bad --spec-owner: one usage line, before anything connects
        raise click.UsageError(str(e)) from None


def _finding_spec(network: NetworkConfig, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn`, with a run spec that cannot be found explained by whom this node trusts to sign it: joined through a
    stage peer without --spec-owner, a node trusts only that peer, which never signs the spec."""
    def run() -> Any:
        from cfnode.node.swarm_map import SpecNotFound

        try:
            return fn()
        except SpecNotFound as e:
            if network.spec_owner_ids:
                raise
            raise SpecNotFound(f"{e} (without --spec-owner the run spec must be signed by an --initial-peers peer, "
                               "the bootstrap: join through its address, or name its peer id with --spec-owner "
                               "PEER_ID to join through any live peer)") from None

    return run


threads_option = click.option(
    "--threads", type=click.IntRange(min=1), envvar="CFNODE_THREADS",
    help="torch compute threads of this process (default: torch's choice, one per core). Several nodes on one "
         "machine each want their share of the cores: `cfnode swarm` gives each cores / processes.")


init_from_option = click.option(
    "--init-from", type=click.Path(exists=True, file_okay=False), metavar="DIR", envvar="CFNODE_INIT_FROM",
    help="A local copy of the Hugging Face Llama checkpoint the run started from (the bootstrap's --init-from): this "
         "node loads its own part of it, checked against the digest in the run spec, where no live copy exists yet.")


@click.group(cls=CfnodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cfnode")
def main() -> None:
    """cfnode: train a LLaMa-style model over a swarm of unreliable peers.

    Start a `bootstrap`, `join` stage peers to it, then `train`. `swarm` does all of it on this machine.
    """


@main.command()
@network_options
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), envvar="CFNODE_CONFIG",
              help="Run spec as YAML, TOML or JSON (keys: num_stages, layers_per_stage, hidden_size, ...).")
@click.option("--maddr-file", type=click.Path(dir_okay=False), help="Write the bootstrap's multiaddr here.")
@click.option("--trainer", "trainers", multiple=True, metavar="FILE", envvar="CFNODE_TRAINERS",
              help="A trainer this run authorises: its identity file (created if missing; start that trainer with "
                   "--identity FILE) or a file with its public key line. Repeatable; at least one is needed. "
                   "Env: CFNODE_TRAINERS (space-separated).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              envvar="CFNODE_TOKENIZER",
              help="The run's tokenizer file (`cfnode tokenizer train`): the spec pins it by its sha256 and takes its "
                   "vocabulary size as vocab_size, over the config's. Every trainer starts with the same file "
                   "(`cfnode train --tokenizer FILE`). Default: the config's tokenizer, else bytes.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), metavar="DIR", envvar="CFNODE_INIT_FROM",
              help="Start the run from a pre-trained Hugging Face Llama directory (safetensors): the model's shape "
                   "comes from its config.json (cut into --config's num_stages, else what a cfnode export records), "
                   "and the spec pins each stage's slice by digest. Peers and the trainer load their parts from "
                   "their own copies (their --init-from).")
def bootstrap(config_path: str | None, maddr_file: str | None, trainers: tuple[str, ...], init_from: str | None,
              **kw: Any) -> None:
    """Start the DHT entry point and publish the run spec.

    With --identity FILE (and a fixed --port) it comes back after a restart as the same peer at the same address,
    and keeps the furthest step it saw the run reach in FILE.progress.json, so newcomers that join through it
    just after a restart still know the run trained (and never start it over from fresh weights)."""
    from cfnode.bootstrap.server import run_bootstrap
    from cfnode.node.runtime import run_role
    from cfnode.protocol.trust import read_trainer_key

    network = _network(kw, require_peers=False)
    spec = _run("bootstrap", lambda: RunSpec.from_file(config_path) if config_path else RunSpec())
    keys = _run("bootstrap", lambda: tuple(dict.fromkeys([*spec.trainer_keys, *map(read_trainer_key, trainers)])))
    if not keys:
        _run("bootstrap", lambda: _fail("name the run's trainer with --trainer FILE (its identity file, created if "
                                        "missing): stage peers take training calls only from the trainers the run "
                                        "spec names"))
    spec = _run("bootstrap", lambda: spec.replace(run_id=network.run_id, trainer_keys=keys))
    if init_from is not None:
        from cfnode.hf.init_from import spec_from_checkpoint

        stages = spec.num_stages if config_path else None
        spec = _run("bootstrap", lambda: spec_from_checkpoint(init_from, spec, stages))
    tokenizer_path = kw.pop("tokenizer_path")
    if tokenizer_path is not None:
        from cfnode.data.tokenizer import pin_tokenizer

        pinned = _run("bootstrap", lambda: pin_tokenizer(spec, tokenizer_path))
        if init_from is not None and pinned.vocab_size != spec.vocab_size:
            _run("bootstrap", lambda: _fail(f"the tokenizer file {tokenizer_path} has {pinned.vocab_size} tokens but "
                                            f"the --init-from checkpoint's vocabulary has {spec.vocab_size}: use the "
                                            "checkpoint's own tokenizer"))
        spec = pinned
    _run("bootstrap", lambda: run_role(lambda: run_bootstrap(network, spec, maddr_file)))


class SecondsOrForever(click.ParamType):
    """A positive number of seconds, or `forever` (infinity)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        if str(value).strip().lower() in ("forever", "inf", "infinity"):
            return math.inf
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of seconds nor 'forever'", param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"must be a positive number of seconds or 'forever', got {value!r}", param, ctx)
        return seconds


SECONDS_OR_FOREVER = SecondsOrForever()


def _fail(message: str) -> None:
    raise ConfigError(message)


def _parse_stage(value: str) -> int | None:
    if value == "auto":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"must be 'auto' or a stage number >= 1, got {value!r}", param_hint="--stage")


@main.command()
@network_options
@click.option("--stage", default="auto", show_default=True, envvar="CFNODE_STAGE",
              help="Body stage to serve (1..S), or 'auto': a lost stage first, else the weakest.")
@click.option("--device", default="cpu", show_default=True, envvar="CFNODE_DEVICE",
              type=click.Choice(["cpu", "cuda"]), help="Where this stage computes.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds for this peer's own calls (state download, gradient exchange).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="CFNODE_METRICS_PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host).")
@click.option("--standby", is_flag=True, envvar="CFNODE_STANDBY",
              help="With --stage auto: stay connected as a warm spare and take the first stage that loses "
                   "every peer (no start-up delay when it happens).")
@click.option("--leave-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              envvar="CFNODE_LEAVE_TIMEOUT",
              help="On SIGTERM (kill, docker stop): seconds to finish in-flight work and, as a stage's last "
                   "peer, hand its exact state to a joining newcomer or a neighbouring stage.")
@click.option("--keep-activations", type=click.IntRange(min=0), default=16, show_default=True,
              envvar="CFNODE_KEEP_ACTIVATIONS",
              help="Microbatches whose forward activations this peer keeps until their backward arrives, instead "
                   "of recomputing the forward (0: always recompute; saves memory).")
@click.option("--trace-dir", type=click.Path(file_okay=False), metavar="DIR", envvar="CFNODE_TRACE_DIR",
              help="Write a JSON line for each forward, backward and step this peer computes, with its start and "
                   "end on the wall clock, to DIR/stage<S>-<peer id>.jsonl (pipeline timelines).")
@init_from_option
@click.option("--state", "state_path", type=click.Path(dir_okay=False), envvar="CFNODE_PEER_STATE",
              help="Save this replica's exact state (weights, optimiser, step) to this file every --state-every "
                   "steps and on leaving, so `cfnode export --from-state` can rebuild the model once the swarm is "
                   "gone.")
@click.option("--state-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Save the --state file every N steps (and on leaving).")
@threads_option
def join(stage: str, device: str, request_timeout: float, metrics_port: int | None, standby: bool,
         leave_timeout: float, keep_activations: int, trace_dir: str | None, init_from: str | None,
         state_path: str | None, state_every: int, threads: int | None, **kw: Any) -> None:
    """Serve one pipeline stage until stopped (SIGTERM leaves cleanly, handing the stage over)."""
    from cfnode.node.join import run_join
    from cfnode.node.runtime import run_role

    chosen = _parse_stage(stage)
    _check_device(device)
    if standby and chosen is not None:
        raise click.BadParameter("a standby peer chooses its stage itself: use it with --stage auto",
                                 param_hint="--standby")
    if trace_dir is not None:
        try:  # here, so a bad directory fails before the peer connects
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise click.BadParameter(f"cannot create {trace_dir}: {e.strerror}", param_hint="--trace-dir") from None
    config = JoinConfig(_network(kw), chosen, device, request_timeout, metrics_port, standby=standby,
                        leave_timeout=leave_timeout, keep_activations=keep_activations, trace_dir=trace_dir,
                        init_from=init_from, state_path=state_path, state_every=state_every)
    _set_threads(threads)
    _run("join", _finding_spec(config.network, lambda: run_role(lambda: run_join(config))))


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")


@main.command()
@network_options
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Optimiser steps to train.")
@click.option("--data", "data_path", type=click.Path(exists=True), envvar="CFNODE_DATA",
              help="Text file or folder of .txt files (tokenized at start), or a token directory that `cfnode data "
                   "prepare` wrote (memory-mapped). Default: the Python standard library's source.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              envvar="CFNODE_TOKENIZER",
              help="The run's tokenizer file, where the run spec names one: refused unless its sha256 and size are "
                   "the spec's. Not needed for the byte tokenizer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per step.")
@click.option("--microbatches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Microbatches per step; they flow through the stages concurrently.")
@click.option("--log-jsonl", type=click.Path(dir_okay=False), envvar="CFNODE_LOG_JSONL",
              help="Append one JSON line per step and per swarm event.")
@click.option("--eval-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Validation loss every N steps (0: only at the end).")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds per forward, backward or step call before trying another replica.")
@click.option("--stage-timeout", type=SECONDS_OR_FOREVER, default="300", show_default=True, metavar="SECONDS|forever",
              envvar="CFNODE_STAGE_TIMEOUT",
              help="How long to wait for a stage with no usable peer (at start, or lost mid-run) before giving up; "
                   "'forever' waits as long as it takes. The wait is logged every 30 s.")
@click.option("--ban-seconds", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Seconds a peer whose call failed is skipped.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order.")
@click.option("--client-mode", is_flag=True,
              help="Accept no incoming connections (a DHT client): for a trainer behind NAT or a firewall.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="CFNODE_METRICS_PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), envvar="CFNODE_TRAINER_STATE",
              help="Keep the embedding and head (with optimiser state) in this file, saved every --state-every "
                   "steps and on exit; a restarted trainer resumes from it or from the edge stages' copy, whichever "
                   "is newer.")
@click.option("--state-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Save the --state file every N steps (and on exit).")
@click.option("--pipe/--no-pipe", default=True, show_default=True,
              help="Send forward and backward calls on one long-lived stream per peer, instead of a stream per "
                   "call (which costs the p2p daemons and both event loops about twice the CPU per call).")
@init_from_option
@threads_option
def train(steps: int, data_path: str | None, batch_size: int, microbatches: int, log_jsonl: str | None,
          eval_every: int, request_timeout: float, stage_timeout: float, ban_seconds: float, device: str, seed: int,
          client_mode: bool, metrics_port: int | None, state_path: str | None, state_every: int, pipe: bool,
          init_from: str | None, threads: int | None, **kw: Any) -> None:
    """Train N steps through the swarm's stages."""
    from cfnode.node.runtime import run_role
    from cfnode.node.trainer import run_train

    _check_device(device)
    config = _run("train", lambda: TrainConfig(
        network=_network(kw, client_mode=client_mode), steps=steps, data_path=data_path, batch_size=batch_size,
        microbatches=microbatches, log_jsonl=log_jsonl, eval_every=eval_every, request_timeout=request_timeout,
        stage_timeout=stage_timeout, ban_seconds=ban_seconds, device=device, seed=seed, metrics_port=metrics_port,
        state_path=state_path, state_every=state_every, pipe=pipe, init_from=init_from,
        tokenizer_path=kw.pop("tokenizer_path"),
    ))
    _set_threads(threads)
    summary = _run("train", _finding_spec(config.network, lambda: run_role(lambda: run_train(config))))
    click.echo(f"trained to step {summary['final_step']}: loss {summary['loss']:.4f}"
               + (f", validation loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""))


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
def identity(path: str) -> None:
    """Print the peer id and public key of the identity file PATH (created if missing).

    A trainer on another machine runs this and hands the public key line, saved to a file, to the bootstrap's
    operator for `cfnode bootstrap --trainer FILE`; the trainer itself then starts with `--identity PATH`.
    """
    from cfnode.protocol.identity import create_identity, load_identity
    from cfnode.protocol.trust import public_key_line

    loaded = _run("identity", lambda: load_identity(path) if Path(path).exists() else create_identity(path))
    click.echo(f"peer id: {loaded.peer_id.to_base58()}")
    click.echo(public_key_line(loaded))


@main.command()
@network_options
@click.option("--json", "as_json", is_flag=True, help="Print the stage map as JSON (with --watch: one line each).")
@click.option("--client-mode/--no-client-mode", default=True, show_default=True,
              help="Accept no incoming connections (a DHT client), so status works from behind NAT.")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, metavar="[SECONDS]",
              help="Redraw every SECONDS (default 2) until Ctrl-C, over one connection.")
def status(as_json: bool, client_mode: bool, watch: float | None, **kw: Any) -> None:
    """Show every stage's peers; exit 1 if a stage has no live peer."""
    from cfnode.node.runtime import run_role
    from cfnode.node.status import collect_status, render_table, watch_status

    network = _network(kw, client_mode=client_mode)
    if watch is not None:
        def show(report: dict[str, Any]) -> None:
            if as_json:
                click.echo(json.dumps(report))
                return
            if sys.stdout.isatty():
                click.echo("\033[H\033[J", nl=False)  # clear the terminal: the table redraws in place
            click.echo(f"{time.strftime('%H:%M:%S')}: every {watch:g} s, Ctrl-C to stop\n{render_table(report)}\n")

        _run("status", _finding_spec(network, lambda: run_role(lambda: watch_status(network, watch, show))))
        return
    report = _run("status", _finding_spec(network, lambda: run_role(lambda: collect_status(network))))
    click.echo(json.dumps(report, indent=2) if as_json else render_table(report))
    if any(not stage["online"] for stage in report["stages"]):
        sys.exit(1)


@main.command()
@network_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="The directory to write (new or empty): config.json, model.safetensors, generation_config.json "
                   "and the tokenizer files.")
@click.option("--trainer-state", type=click.Path(exists=True, dir_okay=False), envvar="CFNODE_TRAINER_STATE",
              help="The trainer's state file (its --state), for the embedding, final norm and head. Without it they "
                   "come from the copies the edge stages keep.")
@click.option("--from-state", "state_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              metavar="FILE", help="Export offline, from saved state files instead of a live swarm: the trainer's "
                                   "(`cfnode train --state`) and one per stage (`cfnode join --state`). Repeatable.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), envvar="CFNODE_TOKENIZER",
              help="The run's tokenizer file, where the run spec names one (checked against its digest).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for one stage's weights.")
def export(out_dir: str, trainer_state: str | None, state_files: tuple[str, ...], tokenizer_path: str | None,
           timeout: float, **kw: Any) -> None:
    """Write the swarm's model as a Hugging Face Llama directory that transformers loads.

    From a live swarm (--initial-peers), each stage's exact weights come from one of its peers; offline
    (--from-state), from state files. A swarm with a lost stage, or parts at different steps, is refused.
    """
    from cfnode.hf.export import collect_live, collect_offline, export_model
    from cfnode.node.runtime import run_role

    started = time.perf_counter()
    if state_files:
        parts = _run("export", lambda: collect_offline(state_files))
    else:
        network = _network(kw, client_mode=True)
        parts = _run("export", _finding_spec(network, lambda: run_role(lambda: collect_live(network, trainer_state,
                                                                                           timeout))))
    out = _run("export", lambda: export_model(parts, out_dir, tokenizer_path))
    click.echo(f"exported step {parts.step} of run {parts.spec.run_id!r} to {out} in "
               f"{time.perf_counter() - started:.1f} s: load it with transformers' "
               f"AutoModelForCausalLM.from_pretrained, or sample with `cfnode generate --model {out}`")


@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="A Hugging Face Llama directory (what `cfnode export` writes).")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="Softmax temperature; 0 always takes the most likely token.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample only among the K most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same text.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
def generate(model_dir: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
             device: str) -> None:
    """Continue a prompt with a model directory, using cfnode's own model code (with a KV cache)."""
    from cfnode.hf.load import sample_text

    _check_device(device)
    text = _run("generate", lambda: sample_text(model_dir, prompt, max_new_tokens, temperature, top_k, seed, device))
    click.echo(prompt + text)


def _parse_kill(value: str, num_stages: int) -> tuple[int, int]:
    stage, _, step = value.partition("@")
    if not (stage.isdigit() and step.isdigit()) or not 1 <= int(stage) <= num_stages or int(step) < 1:
        raise click.BadParameter(f"expected STAGE@STEP with STAGE in 1..{num_stages} and STEP >= 1, got {value!r}",
                                 param_hint="--kill")
    return int(stage), int(step)


@main.command()
@click.option("--stages", type=click.IntRange(min=1), help="Body stages (default: the config's, else 3).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Peers per stage.")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True, help="Training steps.")
@click.option("--data", "data_path", type=click.Path(exists=True),
              help="Text file or folder of .txt files, or a token directory (`cfnode data prepare`).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              envvar="CFNODE_TOKENIZER",
              help="The run's tokenizer file (`cfnode tokenizer train`), for the bootstrap to pin and the trainer to "
                   "use. Default: the config's tokenizer, else bytes.")
@click.option("--log-jsonl", type=click.Path(dir_okay=False), help="The trainer's JSON lines log.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Run spec file; --stages overrides its num_stages.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--microbatches", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--kill", "kills", multiple=True, metavar="STAGE@STEP",
              help="SIGKILL every peer of STAGE when the trainer reaches STEP, then start a newcomer with "
                   "--stage auto; repeatable.")
@click.option("--churn", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Chance per stage per step that all its peers are SIGKILLed (a newcomer follows).")
@click.option("--churn-seed", type=int, default=0, show_default=True, help="Seed of the --churn failures.")
@click.option("--recovery", type=click.Choice(RECOVERY_MODES),
              help="Recovery mode of the run spec (default: the config's, else checkfree).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the processes' logs go (default: a temp dir).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--export/--no-export", "export_model", default=True, show_default=True,
              help="After training, export the model as a Hugging Face Llama directory and print a sample of it.")
@click.option("--model-out", type=click.Path(file_okay=False), help="Where to export it (default: WORKDIR/model).")
@click.option("--prompt", default="def ", show_default=True, help="The prompt the sample continues.")
def swarm(stages: int | None, replicas: int, steps: int, data_path: str | None, tokenizer_path: str | None,
          log_jsonl: str | None, config_path: str | None, batch_size: int, microbatches: int, kills: tuple[str, ...],
          churn: float, churn_seed: int, recovery: str | None, workdir: str | None, log_level: str, export_model: bool,
          model_out: str | None, prompt: str) -> None:
    """Run a whole swarm on this machine: bootstrap, stages x replicas peers and a trainer; then export the
    trained model and print a sample of it."""
    from cfnode.launcher import LocalSwarm, SwarmLayout

    _setup_logging(log_level)
    spec = _run("swarm", lambda: RunSpec.from_file(config_path) if config_path else RunSpec())
    if stages is not None:
        spec = _run("swarm", lambda: spec.replace(num_stages=stages))
    if recovery is not None:
        spec = spec.replace(recovery=recovery)
    if tokenizer_path is not None:  # checked here, so a bad file is one line now rather than a failed bootstrap
        from cfnode.data.tokenizer import pin_tokenizer

        spec = _run("swarm", lambda: pin_tokenizer(spec, tokenizer_path))
    schedule = [_parse_kill(k, spec.num_stages) for k in kills]
    layout = SwarmLayout(spec=spec, replicas=replicas, steps=steps, data_path=data_path, log_jsonl=log_jsonl,
                         batch_size=batch_size, microbatches=microbatches,
                         workdir=Path(workdir) if workdir else None, log_level=log_level, kills=schedule,
                         churn=churn, churn_seed=churn_seed, export=export_model,
                         model_out=Path(model_out) if model_out else None, prompt=prompt,
                         tokenizer_path=tokenizer_path)
    code = _run("swarm", lambda: LocalSwarm(layout).run())
    sys.exit(code)


@main.group()
def bench() -> None:
    """Benchmarks (see docs/benchmarks.md)."""


def _comma_list(kind: type, choices: tuple[str, ...] | None = None) -> Callable[[Any, Any, str], list]:
    def parse(ctx: Any, param: Any, value: str) -> list:
        try:
            items = [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise click.BadParameter(f"choose from {', '.join(choices or ())}; got {value!r}")
        return items

    return parse


@bench.command()
@click.option("--methods", default="none,checkpoint,checkpoint-yd,redundant,checkfree,checkfree+,checkfree+refit,"
                                   "checkfree++refit", show_default=True,
              help="Comma list of none, checkpoint, checkpoint-yd, redundant, checkfree, checkfree+, uniform, copy, "
                   "random, checkfree+refit, checkfree++refit, copy+refit, or all (with --backend swarm: checkfree).")
@click.option("--failure-rates", "rates", default="0.05,0.10,0.16", show_default=True,
              callback=_comma_list(float), help="Hourly failure rates per stage, comma list: 5/10/16/33% use the "
                                                "paper's per-iteration probabilities, others "
                                                "1 - (1 - rate) ** (--paper-iteration-seconds / 3600).")
@click.option("--steps", type=click.IntRange(min=1), default=600, show_default=True,
              help="Training steps per run (at least; a run goes on to the target).")
@click.option("--target-loss", type=float, help="Target validation loss (default: the mean over seeds of the "
                                                "no-failure runs' at 75% of their steps).")
@click.option("--data", "data_path", type=click.Path(exists=True),
              help="Text file or folder of .txt files. Default: the built-in corpus.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_comma_list(int),
              help="Seeds of the failures, data order and weights, comma list; every method runs each.")
@click.option("--seed", type=int, help="One seed only (the same as --seeds N).")
@click.option("--jobs", type=click.IntRange(min=1), help="Runs in parallel processes, one torch thread each "
                                                         "(default: the cores available). Results do not depend on it.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="churn-bench", show_default=True,
              help="Where the table, plots, JSON and checkpoints go.")
@click.option("--backend", type=click.Choice(["sim", "swarm"]), default="sim", show_default=True,
              help="sim: in-process pipelines; swarm: real processes on 127.0.0.1 for the live recovery modes, one "
                   "swarm at a time (each beside its sim run; pass one rate, one seed and fewer --steps).")
@click.option("--downtime", type=click.FloatRange(min=0), help="Iterations lost per failure event, every method "
                                                               "(default: the paper's 30 s / its iteration, 0.33).")
@click.option("--checkpoint-gb", type=click.FloatRange(min=0), default=6.0, show_default=True,
              help="GB a checkpoint saves or restores (the paper's 500M parameters x 12 bytes: weights + AdamW).")
@click.option("--storage-mbps", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Checkpoint storage bandwidth, megabytes per second (100 MB/s = the paper's ~800 Mbit/s links).")
@click.option("--paper-iteration-seconds", type=click.FloatRange(min=0, min_open=True), default=91.0,
              show_default=True, help="Seconds of the paper's plain iteration: the time unit the costs are "
                                      "expressed in, and the rate -> p rule for rates outside the paper's table.")
@click.option("--save-cost", type=click.FloatRange(min=0), help="Iterations per checkpoint save (default: "
                                                                "checkpoint GB / storage MB/s / iteration s).")
@click.option("--restore-cost", type=click.FloatRange(min=0), help="Iterations per rollback of every stage to the "
                                                                   "last save (default: as --save-cost's default).")
@click.option("--redundant-cost", type=click.FloatRange(min=1), help="Iteration cost of redundant computation "
                                                                     "(default: each run's measured ratio; the "
                                                                     "paper's is 151/91 = 1.66).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=20, show_default=True,
              help="Steps between checkpoints of method checkpoint (checkpoint-yd: the Young-Daly interval).")
@click.option("--stages", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--layers-per-stage", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--hidden", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--microbatches", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=25, show_default=True,
              help="Validation loss every N iterations.")
@click.option("--eval-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Validation batches per evaluation.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per run.")
@click.option("--refit-cache", type=click.IntRange(min=1), default=16, show_default=True,
              help="The +refit methods: (input, output) pairs kept per stage for the refit.")
@click.option("--refit-steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="The +refit methods: at most this many refit steps.")
@click.option("--fresh", is_flag=True, help="Run every sim run again, even one that OUT/runs/ holds from an earlier "
                                            "sweep with the same settings (by default those are reused, so a "
                                            "stopped sweep continues where it was).")
def churn(methods: str, rates: list[float], steps: int, target_loss: float | None, data_path: str | None,
          seeds: list[int], seed: int | None, jobs: int | None, out_dir: str, backend: str, downtime: float | None,
          checkpoint_gb: float, storage_mbps: float, paper_iteration_seconds: float, save_cost: float | None,
          restore_cost: float | None, redundant_cost: float | None, checkpoint_every: int, stages: int,
          layers_per_stage: int, hidden: int, heads: int, seq_len: int, batch_size: int, microbatches: int,
          eval_every: int, eval_batches: int, threads: int, refit_cache: int, refit_steps: int, fresh: bool) -> None:
    """Time to a target validation loss under stage failures, per recovery method (the paper's Table 2)."""
    from cfnode.bench.churn import DEFAULT_SPEC, ChurnConfig, default_jobs, run_churn
    from cfnode.bench.sim import METHODS
    from cfnode.bench.time_model import TimeModel

    chosen = list(METHODS) if methods.strip() == "all" else _comma_list(str, METHODS)(None, None, methods)
    if backend == "swarm" and methods.strip() == "all":
        chosen = ["checkfree"]
    if seed is not None:
        seeds = [seed]
    spec = _run("bench churn", lambda: DEFAULT_SPEC.replace(num_stages=stages, layers_per_stage=layers_per_stage,
                                                            hidden_size=hidden, num_heads=heads, seq_len=seq_len,
                                                            seed=seeds[0], refit_cache=refit_cache,
                                                            refit_steps=refit_steps))
    model = _run("bench churn", lambda: TimeModel.from_numbers(
        state_bytes=checkpoint_gb * 1e9, storage_bytes_per_second=storage_mbps * 1e6,
        iteration_seconds=paper_iteration_seconds, downtime=downtime, save_cost=save_cost, restore_cost=restore_cost,
        redundant_cost=redundant_cost))
    config = ChurnConfig(spec=spec, steps=steps, batch_size=batch_size, microbatches=microbatches,
                         eval_every=eval_every, eval_batches=eval_batches, time=model,
                         checkpoint_every=checkpoint_every, seed=seeds[0], threads=threads)
    _run("bench churn", lambda: run_churn(chosen, rates, config, data_path, Path(out_dir), backend, target_loss,
                                          seeds=seeds, jobs=jobs or default_jobs(), reuse=not fresh))


# `cfnode tokenizer train` and `cfnode data prepare` (cfnode/data/commands.py)
main.add_command(data_commands.tokenizer)
main.add_command(data_commands.data)
