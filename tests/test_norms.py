"""The norms module shared by attacks and training: perturbation norms and the two eps-ball projections."""

import pytest
import torch

from invarbench.attacks.norms import perturbation_norm, project, project_perturbation

PROJECTIONS = {
    "project": lambda x, x0, **kw: project(x, x0, **kw),
    "project_perturbation": lambda x, x0, **kw: project_perturbation(x0, x, **kw),
}


def test_norm_of_a_single_vector_in_closed_form():
    delta = torch.tensor([[3.0, -4.0]])
    assert perturbation_norm(delta, "l2").tolist() == [5.0]
    assert perturbation_norm(delta, "linf").tolist() == [4.0]
    assert perturbation_norm(torch.zeros(2, 1, 3, 3), "l2").tolist() == [
        0.0,
        0.0,
    ], "one norm per point, over every other dimension"


@pytest.mark.parametrize("name", PROJECTIONS)
def test_projection_of_a_single_vector_in_closed_form(name):
    projection = PROJECTIONS[name]
    x0 = torch.tensor([[0.5, 0.5]])
    # l_2: the perturbation (3, 4) of length 5 scaled to length 1 is (0.6, 0.8).
    assert torch.allclose(
        projection(torch.tensor([[3.5, 4.5]]), x0, norm="l2", eps=1.0, bounds=(-10.0, 10.0)), torch.tensor([[1.1, 1.3]])
    )
    # l_inf: each coordinate clipped to [x0 - eps, x0 + eps].
    assert torch.allclose(
        projection(torch.tensor([[0.9, 0.2]]), x0, norm="linf", eps=0.1, bounds=(0.0, 1.0)), torch.tensor([[0.6, 0.4]])
    )
    # Then the bounds: (1.1, 1.3) is clipped to (1, 1).
    assert projection(torch.tensor([[3.5, 4.5]]), x0, norm="l2", eps=1.0, bounds=(0.0, 1.0)).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("name", PROJECTIONS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(8, 30), (5, 1, 7, 7)])
def test_projection_lands_inside_the_ball_and_the_bounds_and_keeps_points_inside(name, norm, shape):
    projection = PROJECTIONS[name]
    generator = torch.Generator().manual_seed(0)
    eps, bounds = (0.1 if norm == "linf" else 0.5), (0.0, 1.0)
    x0 = torch.rand(shape, generator=generator)
    x = x0 + torch.randn(shape, generator=generator)
    projected = projection(x, x0, norm=norm, eps=eps, bounds=bounds)
    assert (perturbation_norm(projected - x0, norm) <= eps * (1 + 1e-6)).all()
    assert projected.min() >= 0.0 and projected.max() <= 1.0
    assert (projected == 0.0).any() and (projected == 1.0).any(), "points pushed past the bounds end on them"
    # A point already inside the ball and the bounds stays where it is.
    inside = x0 + (projected - x0) * 0.5
    assert torch.allclose(projection(inside, x0, norm=norm, eps=eps, bounds=bounds), inside, atol=1e-6)


def test_step_projection_without_bounds_and_at_eps_zero():
    x0, x = torch.zeros(2, 3), torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(project(x, x0, norm="l2", eps=2.0), torch.tensor([[1.2, 0.0, 1.6], [0.0, 0.0, 0.0]]))
    assert torch.equal(project(x, x0, norm="l2", eps=0.0), x0), (
        "eps 0 (the start of a training eps ramp) gives the point itself"
    )
