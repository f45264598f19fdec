"""The order in which a microbatch visits the body stages: in order, or CheckFree+'s out-of-order swap.

CheckFree+ (arXiv 2506.15461, section 4.3) sends part of every step's microbatches through the stages with the
first two and the last two swapped, 2,1,3,...,S-2,S,S-1, so stage 2 learns to stand in for stage 1 and stage
S-1 for stage S. A lost edge stage is then rebuilt by copying that neighbour.
"""

from __future__ import annotations

import math


def route_order(num_stages: int, swapped: bool, variant: int = 0) -> list[int]:
    """The body stages a microbatch passes, in order.

    S >= 4: the paper's swap, 2,1,3,...,S-2,S,S-1. S = 3: the two swaps overlap on stage 2, so swapped
    microbatches alternate (by `variant`) between 2,1,3 and 1,3,2. S = 2: 2,1. S = 1 has nothing to swap.
    """
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    order = list(range(1, num_stages + 1))
    if not swapped:
        return order
    if num_stages == 1:
        raise ValueError("CheckFree+ needs at least 2 body stages: a single stage has no neighbour to swap with")
    if num_stages == 3:
        return [2, 1, 3] if variant % 2 == 0 else [1, 3, 2]
    order[0], order[1] = order[1], order[0]
    if num_stages >= 4:
        order[-1], order[-2] = order[-2], order[-1]
    return order


def microbatch_routes(num_stages: int, num_microbatches: int, recovery: str, swap_fraction: float) -> list[list[int]]:
    """The route of each microbatch of a step. Only `checkfree+` swaps; it swaps round(M * fraction) of them,
    spread evenly over the step."""
    if not 0.0 <= swap_fraction <= 1.0:
        raise ValueError(f"swap fraction must be in [0, 1], got {swap_fraction}")
    routes, swaps = [], 0
    for index in range(num_microbatches):
        swapped = recovery == "checkfree+" and math.floor((index + 1) * swap_fraction + 0.5) > math.floor(
            index * swap_fraction + 0.5)
        routes.append(route_order(num_stages, swapped, variant=swaps))
        swaps += swapped
    return routes
