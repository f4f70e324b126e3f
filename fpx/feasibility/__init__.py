"""Feasibility problems: sets given by projections, splittings as fixed-point operators."""

from ._projections import project_spectral_norm_ball as project_spectral_norm_ball
