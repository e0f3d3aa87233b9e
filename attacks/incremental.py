"""Forward passes of examples that differ from the current ones only inside a few square windows.

Square changes one window of an example per query at l_inf and two at l_2, and most of its queries use
windows of a few pixels. A convolutional network's first layers see such a change only near the
windows, so re-running them on the whole image computes again what has not changed. This module keeps
the maps every layer of such a prefix produced for each point's current example, and computes a
proposal's maps only where its change can reach (incremental inference, as Krypton does for occlusion
patches: Nakandala et al., SIGMOD 2019):

- a convolution (stride 1) is linear: the change of its output is the convolution of the change of its
  input, confined to the windows grown by the kernel (``conv_transpose2d`` of the input's change);
- an elementwise layer (activations, batch norm in eval mode) acts on the windows' values;
- a pooling layer recomputes the outputs whose pooling regions meet a window, from the current input
  with the windows' new values written over it;
- the layers after the prefix (flatten, the linear head) run on the whole last map, which is small.

Which layers form the prefix is read from the network (a ``nn.Sequential``, or ``features`` followed by
``classifier``), and :meth:`IncrementalForward.build` uses the result only where it gives the model's
logits on sample proposals (1e-4 relative, as the traced forward pass). The convolutions' outputs are
kept up to date by adding changes, so they drift by float rounding as queries are accepted;
:meth:`IncrementalForward.reset` recomputes them from the examples (Square does at every change of the
window size). Which points are broken is always decided on the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from invarbench.evaluation import same_logits

#: Layers that act on each value alone (batch norm only in eval mode).
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.BatchNorm2d,
)


@dataclass
class Windows:
    """One window per point, all of one size: top-left corners ``rows``, ``columns`` (B,) in a layer's map
    and the values there (B, h, w, C), channels last."""

    rows: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor

    def subset(self, chosen: torch.Tensor | slice) -> Windows:
        return Windows(self.rows[chosen], self.columns[chosen], self.values[chosen])


def _span(start: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) indices start, start + 1, ... per point."""
    return start.view(-1, 1) + torch.arange(size, device=start.device)


def window_positions(
    points: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, height: int, width: int, shape: Sequence[int]
) -> torch.Tensor:
    """Flat indices (B * height * width,) of each point's window in maps of ``shape`` (N, H, W, ...)."""
    rows = (points.view(-1, 1) * shape[1] + _span(rows, height)).view(-1, height, 1)
    return (rows * shape[2] + _span(columns, width).view(-1, 1, width)).flatten()


def _gather(
    maps: torch.Tensor, points: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Each point's window of ``maps`` (N, H, W, C): (B, height, width, C)."""
    channels = maps.shape[3]
    return (
        maps.view(-1, channels)
        .index_select(0, window_positions(points, rows, columns, height, width, maps.shape))
        .view(-1, height, width, channels)
    )


def _paste(maps: torch.Tensor, points: torch.Tensor, windows: Windows) -> None:
    """Write ``windows`` into ``maps`` (N, H, W, C, contiguous) at rows ``points`` (in place)."""
    _, height, width, channels = windows.values.shape
    maps.view(-1, channels).index_copy_(
        0,
        window_positions(points, windows.rows, windows.columns, height, width, maps.shape),
        windows.values.reshape(-1, channels),
    )


def _write_over(
    values: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    sources: Sequence[Windows],
    *,
    add: bool = False,
    shifts: Sequence[int] = (0,),
) -> torch.Tensor:
    """``values`` (windows at ``rows``, ``columns``) with ``sources``' values written over them (``add``: added
    to them) where they overlap. For each shift ``j``, source entry ``e`` goes to entry ``(e + j) mod B``
    (a point's other windows, stacked); positions outside the windows go to one spare row."""
    count, height, width, channels = values.shape
    spare = count * height * width
    written = torch.empty(spare + 1, channels, dtype=values.dtype, device=values.device)
    written[:spare] = values.reshape(-1, channels)
    entries = torch.arange(count, device=rows.device)
    for source in sources:
        source_height, source_width = source.values.shape[1:3]
        flat_source = source.values.reshape(-1, channels)
        for shift in shifts:
            target = (entries + shift) % count
            target_rows = _span(source.rows - rows[target], source_height)
            target_columns = _span(source.columns - columns[target], source_width)
            inside = ((target_rows >= 0) & (target_rows < height)).view(-1, source_height, 1) & (
                (target_columns >= 0) & (target_columns < width)
            ).view(-1, 1, source_width)
            flat = (
                target.view(-1, 1, 1) * height + target_rows.view(-1, source_height, 1)
            ) * width + target_columns.view(-1, 1, source_width)
            flat = torch.where(inside, flat, spare).flatten()
            if add:
                written.index_add_(0, flat, flat_source)
            else:
                written.index_copy_(0, flat, flat_source)
    return written[:spare].view(count, height, width, channels)


def _partner_shifts(entries: int, count: int) -> tuple[int, ...]:
    """The shifts that take each of ``count`` stacked windows per point to each window of its point (itself first)."""
    return tuple(shift * (entries // count) for shift in range(count))


def _fit(start: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, int]:
    """Windows of ``size`` at ``start`` moved and cut to lie inside a map of ``limit`` (they still cover
    their part inside it)."""
    size = min(size, limit)
    return start.clamp(0, limit - size), size


class _Stage:
    """One layer of the prefix (``layer``) and the size of its output maps."""

    def __init__(self, layer: nn.Module, output_size: tuple[int, int]):
        self.layer, self.output_size = layer, output_size


class _Convolution(_Stage):
    def __init__(self, layer: nn.Conv2d, output_size: tuple[int, int]):
        super().__init__(layer, output_size)
        kernel = tuple(layer.kernel_size)
        # The change of the output is the "full" convolution of the input's change: conv_transpose2d with the kernel
        # flipped, starting kernel - 1 - padding above and left of the change.
        self.weight = layer.weight.detach().transpose(0, 1).flip(2, 3).contiguous()
        self.shift = (layer.padding[0] - kernel[0] + 1, layer.padding[1] - kernel[1] + 1)

    def windows(
        self, before: torch.Tensor, after: torch.Tensor, points: torch.Tensor, changes: Windows, count: int
    ) -> Windows:
        height, width = changes.values.shape[1:3]
        current = _gather(before, points, changes.rows, changes.columns, height, width)
        if count > 1:
            # A point's later windows change what its earlier ones left, not the current maps.
            size, parts = len(points) // count, [current[: len(points) // count]]
            for window in range(1, count):
                part = slice(window * size, (window + 1) * size)
                earlier = [changes.subset(slice(k * size, (k + 1) * size)) for k in range(window)]
                parts.append(_write_over(current[part], changes.rows[part], changes.columns[part], earlier))
            current = torch.cat(parts)
        delta = Windows(
            changes.rows + self.shift[0],
            changes.columns + self.shift[1],
            F.conv_transpose2d((changes.values - current).permute(0, 3, 1, 2), self.weight).permute(0, 2, 3, 1),
        )
        rows, height = _fit(delta.rows, delta.values.shape[1], self.output_size[0])
        columns, width = _fit(delta.columns, delta.values.shape[2], self.output_size[1])
        return Windows(
            rows,
            columns,
            _write_over(
                _gather(after, points, rows, columns, height, width),
                rows,
                columns,
                [delta],
                add=True,
                shifts=_partner_shifts(len(points), count),
            ),
        )


class _Pooling(_Stage):
    def __init__(self, layer: nn.Module, output_size: tuple[int, int]):
        super().__init__(layer, output_size)
        self.kernel = _pair(layer.kernel_size)
        self.stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size)

    def windows(
        self, before: torch.Tensor, after: torch.Tensor, points: torch.Tensor, changes: Windows, count: int
    ) -> Windows:
        corner, size = [], []
        for axis, start in enumerate((changes.rows, changes.columns)):
            kernel, stride, limit = self.kernel[axis], self.stride[axis], self.output_size[axis]
            first = torch.div(start - kernel + 1 + stride - 1, stride, rounding_mode="floor").clamp(0, limit - 1)
            last = torch.div(start + changes.values.shape[1 + axis] - 1, stride, rounding_mode="floor").clamp(
                0, limit - 1
            )
            first, extent = _fit(first, max(int((last - first).max()) + 1, 1), limit)
            corner.append(first)
            size.append(extent)
        rows, columns = corner[0] * self.stride[0], corner[1] * self.stride[1]
        height, width = (size[0] - 1) * self.stride[0] + self.kernel[0], (size[1] - 1) * self.stride[1] + self.kernel[1]
        region = _write_over(
            _gather(before, points, rows, columns, height, width),
            rows,
            columns,
            [changes],
            shifts=_partner_shifts(len(points), count),
        )
        return Windows(corner[0], corner[1], self.layer(region.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class _Elementwise(_Stage):
    def windows(
        self, before: torch.Tensor, after: torch.Tensor, points: torch.Tensor, changes: Windows, count: int
    ) -> Windows:
        return Windows(
            changes.rows, changes.columns, self.layer(changes.values.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        )


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return (
            tuple(layer.stride) == (1, 1)
            and tuple(layer.dilation) == (1, 1)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        )
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pair(layer.padding) == (0, 0) and not layer.ceil_mode and _pair(getattr(layer, "dilation", 1)) == (1, 1)
    if isinstance(layer, nn.BatchNorm2d):
        return not layer.training
    return isinstance(layer, ELEMENTWISE)


def split_network(network: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    """The longest prefix of ``network``'s layers this module can update locally (it must hold a
    convolution) and the rest as one module; None for networks it cannot read (whether prefix then rest
    is the network is checked on logits by :meth:`IncrementalForward.build`)."""
    if isinstance(network, nn.Sequential):
        layers = list(network)
    elif isinstance(getattr(network, "features", None), nn.Sequential) and isinstance(
        getattr(network, "classifier", None), nn.Module
    ):
        layers = [*network.features, network.classifier]
    else:
        return None
    length = 0
    while length < len(layers) and _supported(layers[length]):
        length += 1
    if not any(isinstance(layer, nn.Conv2d) for layer in layers[:length]):
        return None
    return layers[:length], nn.Sequential(*layers[length:])


class IncrementalForward:
    """Logits of proposals that differ from each point's current example only inside given windows.

    ``to_input`` maps the searched examples (N, C, H, W) to the network's input, elementwise (the model's
    bounds and normalisation). :meth:`reset` takes the current examples, :meth:`propose` the proposals of
    some of the points with their windows, :meth:`commit` adopts the proposals of some of those.
    """

    def __init__(
        self,
        prefix: Sequence[nn.Module],
        head: nn.Module,
        to_input: Callable[[torch.Tensor], torch.Tensor],
        image_size: tuple[int, int],
        channels: int,
    ):
        self.head, self.to_input = head, to_input
        self.layers: list[_Stage] = []
        with torch.no_grad():
            maps = torch.zeros(1, channels, *image_size)
            for layer in prefix:
                maps = layer(maps)
                kind = (
                    _Convolution
                    if isinstance(layer, nn.Conv2d)
                    else _Pooling
                    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d))
                    else _Elementwise
                )
                self.layers.append(kind(layer, tuple(maps.shape[2:])))
        self.maps: list[torch.Tensor] = []
        self.pending: list[Windows] = []
        self.points = torch.zeros(0, dtype=torch.long)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example: torch.Tensor,
        *,
        to_model: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
        seed: int = 0,
    ) -> tuple[IncrementalForward | None, str]:
        """One for ``model`` (a BenchmarkModel in eval mode) on examples like ``example`` (N, C, H, W, in
        the searched space, which ``to_model`` maps to the model's inputs elementwise), checked against
        the model's logits on proposals of one and two windows of several sizes; None (and why) where
        that is not possible or gives other logits."""
        if model.training or example.dim() != 4 or example.device.type != "cpu":
            return None, "not incremental (needs a model in eval mode and images on the CPU)"
        parts = split_network(model.network) if hasattr(model, "network") else None
        if parts is None:
            return None, "not incremental (no convolutional prefix the incremental forward pass can read)"
        try:
            forward = cls(
                parts[0], parts[1], lambda x: model.normalise(to_model(x)), tuple(example.shape[2:]), example.shape[1]
            )
            generator = torch.Generator().manual_seed(seed)
            sample = example[:8]
            with torch.no_grad():
                for windows, side in ((1, 1), (1, 3), (2, 3), (2, 5), (1, min(example.shape[2:]) // 2)):
                    forward.reset(sample)
                    for _ in range(2):
                        proposal, corners = _random_proposal(sample, windows, side, generator)
                        got, expected = (
                            forward.propose(proposal, torch.arange(len(sample)), corners, side),
                            model(to_model(proposal)),
                        )
                        if not same_logits(got, expected):
                            return None, "not incremental (its logits differ from the model's)"
                        forward.commit(torch.ones(len(sample), dtype=torch.bool))
                        sample = proposal
        except Exception as error:  # noqa: BLE001  (a network this module misreads keeps the full forward pass)
            return None, f"not incremental ({type(error).__name__}: {error})"
        return forward, "incremental for small windows"

    @torch.no_grad()
    def reset(self, examples: torch.Tensor) -> torch.Tensor:
        """Take ``examples`` (N, C, H, W) as the points' current examples; returns their logits."""
        maps = self.to_input(examples)
        self.maps = [maps.permute(0, 2, 3, 1).contiguous()]
        for layer in self.layers:
            maps = layer.layer(maps)
            self.maps.append(maps.permute(0, 2, 3, 1).contiguous())
        self.pending = []
        return self.head(maps)

    @torch.no_grad()
    def propose(
        self,
        proposals: torch.Tensor,
        points: torch.Tensor,
        corners: Sequence[tuple[torch.Tensor, torch.Tensor]],
        side: int,
    ) -> torch.Tensor:
        """Logits of ``proposals`` (B, C, H, W) of the points ``points``, each equal to the point's current
        example outside ``side`` x ``side`` windows at ``corners`` ((rows, columns) pairs of (B,) top-left
        corners, one pair per window)."""
        count = len(corners)
        own = torch.arange(len(points), device=points.device).repeat(count)
        rows, columns = torch.cat([pair[0] for pair in corners]), torch.cat([pair[1] for pair in corners])
        changes = Windows(
            rows,
            columns,
            _gather(self.to_input(proposals).permute(0, 2, 3, 1).contiguous(), own, rows, columns, side, side),
        )
        self.points = points.repeat(count)
        self.pending = [changes]
        for layer, before, after in zip(self.layers, self.maps, self.maps[1:]):
            changes = layer.windows(before, after, self.points, changes, count)
            self.pending.append(changes)
        size, zero = len(points), torch.zeros_like(points)
        pieces = [changes.subset(slice(k * size, (k + 1) * size)) for k in range(count)]
        return self.head(_write_over(self.maps[-1].index_select(0, points), zero, zero, pieces).permute(0, 3, 1, 2))

    def commit(self, accepted: torch.Tensor) -> None:
        """The last :meth:`propose`'s proposals (``accepted``, a mask over its points) become those points'
        current examples."""
        every = accepted.repeat(len(self.points) // len(accepted))
        chosen = self.points[every]
        for maps, changes in zip(self.maps, self.pending):
            _paste(maps, chosen, changes.subset(every))


def _random_proposal(
    examples: torch.Tensor, windows: int, side: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``examples`` with ``windows`` random windows of ``side`` filled with noise, and their corners."""
    count, _, height, width = examples.shape
    proposal, corners = examples.clone(), []
    for _ in range(windows):
        rows = torch.randint(0, height - side + 1, (count,), generator=generator)
        columns = torch.randint(0, width - side + 1, (count,), generator=generator)
        noise = torch.rand(examples.shape, generator=generator)
        inside = ((_span(rows, side).unsqueeze(2) == torch.arange(height)).any(1).view(count, 1, height, 1)) & (
            (_span(columns, side).unsqueeze(2) == torch.arange(width)).any(1).view(count, 1, 1, width)
        )
        proposal = torch.where(inside, noise, proposal)
        corners.append((rows, columns))
    return proposal, corners
