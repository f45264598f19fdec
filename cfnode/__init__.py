"""cfnode: train a LLaMa-style model over a swarm of unreliable peers, rebuilding lost stages CheckFree-style."""

__version__ = "0.1.0"
