"""invarbench's own Square attack (Andriushchenko et al., 2020), l_inf and l_2: a gradient-free random search.

The algorithm is the paper's (and pyautoattack's ``SquareAttack`` with ``loss="margin"``), at l_inf:

- start from vertical stripes: every column of every channel moved by +eps or -eps at random;
- at query ``i`` each point still robust proposes one square window of side
  ``round(sqrt(p(i) * h * w))`` at a random place, whose pixels are set to ``x0 + eps`` or ``x0 - eps``
  (one random sign per channel), and keeps it where the margin loss ``z_y - max_{j != y} z_j``
  decreases; ``p(i)`` halves at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 from
  ``p_init`` (``rescale_schedule`` stretches that schedule over the query budget instead);
- a point leaves the search once misclassified (its queries stop).

What differs from pyautoattack's implementation:

- each point draws its own windows and signs (the paper's algorithm; pyautoattack's torch version draws
  one window and one sign per channel for the whole batch at each query), placed for every point at
  once by masks built with broadcasting, no loop over points;
- a proposal that would leave a point's window unchanged (it already holds those signs) flips its
  signs instead of spending the query on the same input, as the paper resamples it (l_inf);
- randomness comes from a ``torch.Generator`` seeded with ``seed`` (drawn on the CPU, so a seed gives
  the same search on every device) and is drawn for every point of the batch at each query, so a
  point's search does not depend on when the other points left it;
- on the CPU the forward passes can go through an inference-optimised copy of the model (traced,
  frozen, oneDNN convolutions: ``trace=True``), used only where it gives the same logits as the model
  on a sample batch (1e-4 relative). The forward passes are where Square's time goes, so this, not
  the placement, is what makes it cheaper (``benchmarks/aa_fast_vs_autoattack.py`` measures it inside
  aa-fast). Which points are broken is always decided on the model itself;
- at l_inf, once the window covers at most 1/12 of the image (from query 500 of 5000 on MNIST), a
  proposal's logits come from the incremental forward pass (attacks/incremental.py, ``incremental=True``)
  where the model is a convolutional network it can read: only the part of each layer's maps that the
  window reaches is computed again. It is checked against the model's logits like the traced copy;
  ``benchmarks/aa_fast_vs_autoattack.py`` measures it inside aa-fast.

l_2 (:func:`square_l2`) follows the paper the same way: the centred-rectangles pattern, two windows per query,
the mass of both moved into the first, the perturbation kept at norm eps.
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_left
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from invarbench.attacks.autoattack import image_shape
from invarbench.attacks.base import Attack, Outcome, register_attack
from invarbench.attacks.incremental import IncrementalForward, window_positions
from invarbench.errors import ConfigError
from invarbench.evaluation import label_margins, logits, model_device, same_logits

#: Queries (counted from 0) after which the share ``p`` of the image a window covers halves again.
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(query: int, *, p_init: float, queries: int, rescale_schedule: bool = False) -> float:
    """The share of the image the window of query ``query`` covers: ``p_init`` halved at each of
    :data:`P_HALVINGS` passed (on a 10000-query scale with ``rescale_schedule``)."""
    if rescale_schedule:
        query = int(query / queries * 10000)
    return p_init / 2 ** bisect_left(P_HALVINGS, query)


def incremental_pays(windows: int, side: int, height: int, width: int) -> bool:
    """Whether the incremental forward pass (attacks/incremental.py) is used for queries of ``windows``
    windows of ``side``: one window covering at most 1/12 of the image (on MNIST's CNN, larger windows or
    two of them, as at l_2, recompute so much of each map that the traced model is as fast)."""
    return windows == 1 and side * side * 12 <= height * width


class _Queries:
    """Square's forward passes: the model's (``forward``), or the incremental one (``incremental``) where
    :func:`incremental_pays`; its maps are recomputed from the current examples whenever the window's
    side changes, so rounding does not pile up."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        incremental: IncrementalForward | None,
        labels: torch.Tensor,
        shape: torch.Size,
    ):
        self.forward, self.incremental, self.labels = forward, incremental, labels
        self.height, self.width = shape[-2:]
        self.side: int | None = None
        self.local = False

    @torch.no_grad()
    def margins(
        self, proposal: torch.Tensor, todo: torch.Tensor, corners, side: int, best: torch.Tensor
    ) -> torch.Tensor:
        """The margins of ``proposal``, the points ``todo``'s examples changed inside ``side`` x ``side``
        windows at ``corners``."""
        self.local = self.incremental is not None and incremental_pays(len(corners), side, self.height, self.width)
        if not self.local:
            return label_margins(self.forward(proposal), self.labels[todo])
        if side != self.side:
            self.incremental.reset(best)
            self.side = side
        return label_margins(self.incremental.propose(proposal, todo, corners, side), self.labels[todo])

    def accept(
        self,
        proposal: torch.Tensor,
        candidate: torch.Tensor,
        todo: torch.Tensor,
        best: torch.Tensor,
        margin: torch.Tensor,
        used: torch.Tensor,
    ) -> None:
        """The points ``todo`` take their ``proposal`` where its margin ``candidate`` is lower (in place)."""
        used[todo] += 1
        better = candidate < margin[todo]
        improved = todo[better]
        best[improved] = proposal[better]
        margin[improved] = candidate[better]
        if self.local:
            self.incremental.commit(better)


def square_linf(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    queries: int,
    generator: torch.Generator,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    bounds: tuple[float, float] = (0.0, 1.0),
    incremental: IncrementalForward | None = None,
    stop: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square l_inf on images ``x`` (N, C, H, W) with ``forward`` giving logits (and ``incremental``, built
    for the same model, for the queries of small windows).

    Returns each point's best example (its first misclassified one where it was broken), the margin
    there (``forward``'s logits) and the number of forward passes it took (the start counts one; at
    most ``queries + 1``, as in pyautoattack). ``stop(query, margin)``, called before every query, returns the
    points whose search ends there (e.g. :class:`invarbench.attacks.aa_fast.SquareStopping`); a point's
    search does not depend on when the others' ended.
    """
    if x.dim() != 4:
        raise ValueError(f"square_linf needs images (N, C, H, W), got shape {tuple(x.shape)}")
    count, channels, height, width = x.shape
    device = x.device
    low, high = bounds

    def draw_signs(shape) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=x.dtype)

    best = (x + eps * draw_signs((count, channels, 1, width))).clamp(low, high)
    margin = label_margins(forward(best), labels)
    used = torch.ones(count, dtype=torch.long, device=device)
    evaluate = _Queries(forward, incremental, labels, x.shape)
    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    stopped = torch.zeros(count, dtype=torch.bool, device=device)
    for query in range(queries):
        if stop is not None:
            stopped |= stop(query, margin).to(device)
        todo = ((margin > 0) & ~stopped).nonzero().flatten()
        if len(todo) == 0:
            break
        p = p_selection(query, p_init=p_init, queries=queries, rescale_schedule=rescale_schedule)
        side = min(max(int(round(math.sqrt(p * height * width))), 1), height, width)
        # Drawn for every point of the batch, used for those still robust.
        top = torch.randint(0, height - side + 1, (count,), generator=generator).to(device)[todo]
        left = torch.randint(0, width - side + 1, (count,), generator=generator).to(device)[todo]
        signs = draw_signs((count, channels, 1, 1))[todo]
        x0, current = x[todo], best[todo]
        inside_rows = (rows >= top.view(-1, 1)) & (rows < (top + side).view(-1, 1))
        inside_columns = (columns >= left.view(-1, 1)) & (columns < (left + side).view(-1, 1))
        window = inside_rows.view(-1, 1, height, 1) & inside_columns.view(-1, 1, 1, width)
        proposal = torch.where(window, (x0 + eps * signs).clamp(low, high), current)
        unchanged = (proposal == current).flatten(1).all(1)
        if unchanged.any():
            signs = torch.where(unchanged.view(-1, 1, 1, 1), -signs, signs)
            proposal = torch.where(window, (x0 + eps * signs).clamp(low, high), current)
        evaluate.accept(proposal, evaluate.margins(proposal, todo, [(top, left)], side, best), todo, best, margin, used)
    return best, margin, used


@lru_cache(maxsize=64)
def _centred_rectangles(rows: int, columns: int) -> torch.Tensor:
    """Nested rectangles around the centre of a ``rows`` x ``columns`` patch, the k-th (side 2k + 1,
    cut by the patch) weighted 1 / (k + 1)^2, summed; unit l_2 norm (all zero for an empty patch)."""
    patch = torch.zeros(rows, columns)
    centre_row, centre_column = rows // 2, columns // 2
    for k in range(max(centre_row, centre_column) + 1):
        top, left = centre_row - k, centre_column - k
        patch[max(top, 0) : top + 2 * k + 1, max(left, 0) : left + 2 * k + 1] += 1.0 / (k + 1) ** 2
    return patch / patch.norm().clamp_min(1e-12)


@lru_cache(maxsize=64)
def square_pattern(side: int) -> torch.Tensor:
    """The l_2 update's s x s pattern: centred rectangles on the top half, their negative on the bottom
    half, unit l_2 norm (the paper's eta)."""
    half = side // 2
    pattern = torch.cat([_centred_rectangles(half, side), -_centred_rectangles(side - half, side)])
    return pattern / pattern.norm().clamp_min(1e-12)


def _place(
    patterns: torch.Tensor | None, top: torch.Tensor, left: torch.Tensor, height: int, width: int, side: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Each point's ``side`` x ``side`` pattern (``patterns`` (K, s, s), or None for none) placed at its own
    corner in a (K, 1, H, W) image of zeros, and the window it covers (bool, same shape). Written
    through flat indices of the windows alone."""
    count, device = len(top), top.device
    flat = window_positions(torch.arange(count, device=device), top, left, side, side, (count, height, width))
    window = (
        torch.zeros(count * height * width, dtype=torch.bool, device=device)
        .index_fill_(0, flat, True)
        .view(count, 1, height, width)
    )
    if patterns is None:
        return None, window
    placed = torch.zeros(count * height * width, dtype=patterns.dtype, device=device).index_copy_(
        0, flat, patterns.flatten()
    )
    return placed.view(count, 1, height, width), window


def _norms(values: torch.Tensor, dims) -> torch.Tensor:
    return values.square().sum(dim=dims, keepdim=True).sqrt()


@torch.no_grad()
def square_l2(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    queries: int,
    generator: torch.Generator,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    bounds: tuple[float, float] = (0.0, 1.0),
    stop: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square l_2 on images ``x`` (N, C, H, W, H and W at least 5) with ``forward`` giving logits; returns
    (and ends points' searches with ``stop``) as :func:`square_linf` does.

    Start: a 5 x 5 grid of tiles of side H // 5, each holding :func:`square_pattern` (transposed or not at
    random) with a random sign per channel, scaled to norm eps. Query ``i``: for each point two windows
    of side ``round(sqrt(p(i) * H * W))`` (odd, at least 3); the perturbation's mass in both moves into
    the first, as the pattern with a random sign per channel plus the first window's old content, scaled
    per channel so that the whole perturbation can reach norm eps; the second window is emptied; the
    perturbation is then scaled to norm eps and the example clipped to the bounds.
    """
    if x.dim() != 4 or min(x.shape[2:]) < 5:
        raise ValueError(f"square_l2 needs images (N, C, H, W) of at least 5 x 5 pixels, got shape {tuple(x.shape)}")
    count, channels, height, width = x.shape
    device, dtype = x.device, x.dtype
    low, high = bounds
    spatial, every = (-2, -1), tuple(range(1, x.dim()))

    def draw_signs(shape) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)

    def draw_patterns(side: int, points: int) -> torch.Tensor:
        pattern = square_pattern(side).to(device=device, dtype=dtype)
        transposed = torch.randint(0, 2, (points,), generator=generator).bool().to(device).view(-1, 1, 1)
        return torch.where(transposed, pattern.T, pattern)

    tile = height // 5
    start = (height - 5 * tile) // 2
    delta = torch.zeros_like(x)
    for row in range(start, height - tile + 1, tile):
        for column in range(start, width - tile + 1, tile):
            delta[:, :, row : row + tile, column : column + tile] += draw_patterns(tile, count).unsqueeze(
                1
            ) * draw_signs((count, channels, 1, 1))
    best = (x + eps * delta / _norms(delta, every).clamp_min(1e-12)).clamp(low, high)
    margin = label_margins(forward(best), labels)
    used = torch.ones(count, dtype=torch.long, device=device)
    evaluate = _Queries(forward, None, labels, x.shape)
    stopped = torch.zeros(count, dtype=torch.bool, device=device)
    for query in range(queries):
        if stop is not None:
            stopped |= stop(query, margin).to(device)
        todo = ((margin > 0) & ~stopped).nonzero().flatten()
        if len(todo) == 0:
            break
        p = p_selection(query, p_init=p_init, queries=queries, rescale_schedule=rescale_schedule)
        side = max(int(round(math.sqrt(p * height * width))), 3)
        side = min(side + (side % 2 == 0), height, width)
        # Drawn for every point of the batch, used for those still robust.
        corners = [
            torch.randint(0, limit - side + 1, (count,), generator=generator).to(device)[todo]
            for limit in (height, width, height, width)
        ]
        patterns = draw_patterns(side, count)[todo]
        signs = draw_signs((count, channels, 1, 1))[todo]
        x0 = x[todo]
        delta = best[todo] - x0
        placed, first = _place(patterns, corners[0], corners[1], height, width, side)
        _, second = _place(None, corners[2], corners[3], height, width, side)
        room = (eps**2 - _norms(delta, every).square()).clamp_min(0) / channels
        mass = _norms(delta * (first | second), spatial)
        update = placed * signs + delta * first / _norms(delta * first, spatial).clamp_min(1e-12)
        update = update / _norms(update, spatial).clamp_min(1e-12) * (room + mass.square()).sqrt()
        delta = torch.where(first, update, torch.where(second, torch.zeros_like(delta), delta))
        proposal = (x0 + eps * delta / _norms(delta, every).clamp_min(1e-12)).clamp(low, high)
        evaluate.accept(proposal, label_margins(forward(proposal), labels[todo]), todo, best, margin, used)
    return best, margin, used


def traced_forward(model: torch.nn.Module, example: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """An inference-optimised copy of ``model`` for forward passes without gradients (traced on
    ``example``, frozen, oneDNN convolutions), and how it was made; ``model`` itself where that is not
    possible or gives other logits than ``model`` on ``example`` (different batch sizes are checked)."""
    if example.device.type != "cpu":
        return model, "eager (traced only on the CPU)"
    if model.training:
        return model, "eager (the model is in training mode)"
    sample = example[:8]
    while len(sample) < 3:  # traced on 2 points, checked on other batch sizes (a trace can record one as a constant)
        sample = torch.cat([sample, sample])
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(model, sample[:2], check_trace=False))
            )
            for batch in (sample, sample[:1], example[: min(len(example), 37)]):
                expected, got = model(batch), traced(batch)
                if not same_logits(got, expected):
                    return model, "eager (the traced model's logits differ from the model's)"
    except Exception as error:  # noqa: BLE001  (any model tracing cannot handle keeps the eager forward)
        return model, f"eager (tracing failed: {type(error).__name__})"
    return traced, "traced (torch.jit.freeze + optimize_for_inference)"


@register_attack
class Square(Attack):
    """Square (Andriushchenko et al., 2020), l_inf and l_2, invarbench's implementation: ``queries`` random
    square updates per point still robust, each point's own windows, seeded; one eps at a time on the
    active points. l_2 needs images of at least 5 x 5 pixels."""

    name = "square"

    def __init__(
        self,
        *,
        queries: int = 5000,
        p_init: float = 0.8,
        rescale_schedule: bool = False,
        trace: bool = True,
        incremental: bool = True,
        batch_size: int = 500,
    ):
        for option, value, least in (("queries", queries, 0), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(
                    f"square: {option} must be an integer >= {least}, got {value!r} "
                    f"(e.g. square:{option}={max(least, 1000)})"
                )
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
            raise ConfigError(
                f"square: p_init is the share of the image the first windows cover, in (0, 1], got {p_init!r} "
                "(e.g. square:p_init=0.8)"
            )
        for option, value in (("rescale_schedule", rescale_schedule), ("trace", trace), ("incremental", incremental)):
            if not isinstance(value, bool):
                raise ConfigError(f"square: {option} must be true or false, got {value!r} (e.g. square:{option}=false)")
        self.queries, self.p_init, self.rescale_schedule, self.trace, self.incremental, self.batch_size = (
            queries,
            float(p_init),
            rescale_schedule,
            trace,
            incremental,
            batch_size,
        )

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace: Path | None = None):
        outcome = Outcome.unattacked(images, epsilons)
        device = model_device(model)
        grid = image_shape(images.shape[1:])
        if norm == "l2" and min(grid[1:]) < 5:
            raise ConfigError(
                "square: l_2 Square tiles the image with 5 x 5 windows and needs images of at least 5 x 5 pixels, "
                f"got inputs of shape {tuple(images.shape[1:])}"
            )
        forward, incremental, how = None, None, "eager"
        queries_used: list[dict] = []
        for index, eps in enumerate(epsilons):
            points = active[index].nonzero().flatten()
            if len(points) == 0:
                continue
            x, y = images[points].cpu(), labels[points].cpu()
            adversarial = x.clone()
            robust = (logits(model, x, batch_size=self.batch_size).argmax(1) == y).nonzero().flatten()
            used = 0
            for start in range(0, len(robust), self.batch_size):
                chosen = robust[start : start + self.batch_size]
                x0 = x[chosen].to(device)
                if forward is None:
                    forward, how = traced_forward(model, x0) if self.trace else (model, "eager")
                    if self.incremental and norm == "linf":
                        incremental, built = IncrementalForward.build(model, x0.reshape(len(x0), *grid))
                        how += f"; {built}"
                call = lambda flat, forward=forward, shape=x0.shape[1:]: forward(  # noqa: E731
                    flat.reshape(len(flat), *shape)
                )
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + start)
                options = {
                    "eps": eps,
                    "queries": self.queries,
                    "generator": generator,
                    "p_init": self.p_init,
                    "rescale_schedule": self.rescale_schedule,
                    "bounds": model.bounds,
                }
                if norm == "linf":
                    best, _, queries = square_linf(
                        call, x0.reshape(len(x0), *grid), y[chosen].to(device), incremental=incremental, **options
                    )
                else:
                    best, _, queries = square_l2(call, x0.reshape(len(x0), *grid), y[chosen].to(device), **options)
                adversarial[chosen] = best.reshape(x0.shape).cpu()
                used += int(queries.sum())
            # The search's examples lie in the ball and the bounds up to float rounding (l_2's rescaling), removed
            # here; the model itself decides success.
            outcome.judge(model, index, points, x, y, adversarial, norm=norm, eps=eps, batch_size=self.batch_size)
            queries_used.append({"eps": eps, "attacked": len(robust), "forward_passes": used})
        details = {
            "implementation": f"invarbench Square ({norm}, each point's own windows)",
            "forward": how,
            "queries_used": queries_used,
        }
        return outcome.result(self.name, norm, epsilons, {**self.options(), **details})
