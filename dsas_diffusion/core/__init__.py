"""The framework-free DSAS core: maps (how), gates (when), hooks (where). Imports torch only."""

from .config import FORMAT_VERSION, LayerInfo, SteeringConfig
from .fit import check_example_sets, fit_from_activations
from .gate import Gate, fit_gate
from .hooks import ActivationCapture, HookSet
from .learned import TrainingOptions
from .maps import ITIC, MAPS, LinEAS, LinearAcT, MeanShift, SteeringMap, map_class
from .modules import find_modules
from .options import RunOptions
from .registry import gate_kinds, methods, register_gate, register_map
from .runtime import SteeringHandle, gate_lambdas
from .steering import CONFIG_NAME, WEIGHTS_NAME, Steering

__all__ = [
    "FORMAT_VERSION", "LayerInfo", "SteeringConfig", "check_example_sets", "fit_from_activations", "Gate",
    "fit_gate", "ActivationCapture", "HookSet", "ITIC", "MAPS", "LinEAS", "LinearAcT", "MeanShift", "SteeringMap",
    "map_class", "TrainingOptions", "gate_kinds", "methods", "register_gate", "register_map", "find_modules", "RunOptions", "SteeringHandle", "gate_lambdas", "CONFIG_NAME", "WEIGHTS_NAME",
    "Steering",
]
