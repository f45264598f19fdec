"""DHT keys of one run. Every key lives under the run id so several runs can share one DHT."""


def spec_key(run_id: str) -> str:
    """The run spec, signed by the bootstrap under its owner subkey."""
    return f"{run_id}.spec"


def stage_key(run_id: str, stage: int) -> str:
    """One key per body stage; each peer of the stage writes its signed announcement under its own owner subkey."""
    return f"{run_id}.stage.{stage}"


def trainer_key(run_id: str) -> str:
    """The trainer's announcement (where newcomers fetch cached activations to refit a rebuilt stage)."""
    return f"{run_id}.trainer"


def claims_key(run_id: str) -> str:
    """Newcomers choosing a stage automatically: each writes its claim under its own owner subkey first."""
    return f"{run_id}.claims"


def progress_key(run_id: str) -> str:
    """The furthest proven step of the run, kept by the bootstrap across its restarts."""
    return f"{run_id}.progress"
