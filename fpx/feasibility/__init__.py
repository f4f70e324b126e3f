"""Feasibility problems: sets given by projections, splittings as fixed-point operators."""

from ._projections import (
    project_affine as project_affine,
    project_bilinear_graph as project_bilinear_graph,
    project_box as project_box,
    project_halfspace as project_halfspace,
    project_hyperplane as project_hyperplane,
    project_l1_ball as project_l1_ball,
    project_l2_ball as project_l2_ball,
    project_linf_ball as project_linf_ball,
    project_nonnegative as project_nonnegative,
    project_psd_cone as project_psd_cone,
    project_relu_graph as project_relu_graph,
    project_second_order_cone as project_second_order_cone,
    project_simplex as project_simplex,
    project_spectral_norm_ball as project_spectral_norm_ball,
)
from ._feasible_point import (
    METHODS as METHODS,
    distance as distance,
    feasible_point as feasible_point,
    gap_tolerance as gap_tolerance,
    splitting as splitting,
)
