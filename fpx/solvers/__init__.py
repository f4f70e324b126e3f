from ._anderson import Anderson as Anderson
from ._base import AbstractFixedPointSolver as AbstractFixedPointSolver
from ._broyden import Broyden as Broyden
from ._halpern import Halpern as Halpern
from ._newton_krylov import NewtonKrylov as NewtonKrylov
from ._picard import KM as KM, Picard as Picard
from ._squarem import SQUAREM as SQUAREM
