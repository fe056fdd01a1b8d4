"""Aggregation: weightings of Gramians as pure functions, and the class-style aggregators.

Every weighting exists in three forms:

* a pure, batched kernel ``<name>_weights(gramian [..., m, m], ...) -> weights [..., m]``;
* a :class:`PureWeighting` ``(init, update)`` pair from a factory (``upgrad()``, ``gradvac()``,
  ...), whose state (a NamedTuple of tensors, ``EmptyState()`` when stateless) is passed in and
  returned; :func:`aggregate` and :func:`aggregate_groups` apply it to Jacobian TensorDicts;
* class-style objects with TorchJD's names (``UPGradWeighting`` maps ``[m, m] -> [m]``, ``UPGrad``
  maps ``[m, n] -> [n]``) that hold their state explicitly in a ``state`` attribute.

Example:
    >>> import torch
    >>> from torchjd_func.aggregation import UPGrad, upgrad_weights
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> upgrad_weights(J @ J.T)
    tensor([1.1109, 0.7894])
    >>> UPGrad()(J)
    tensor([0.2929, 1.9004, 1.9004])
"""

from torchjd_func.aggregation._aggregate import (
    Aggregation,
    GroupAggregation,
    aggregate,
    aggregate_groups,
    init_group_states,
)
from torchjd_func.aggregation._aligned_mtl import (
    AlignedMTL,
    AlignedMTLWeighting,
    aligned_mtl,
    aligned_mtl_weights,
)
from torchjd_func.aggregation._base import (
    Aggregator,
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    InitFn,
    PureWeighting,
    UpdateFn,
    WeightedAggregator,
    Weighting,
    guard_nonfinite,
    stateless,
)
from torchjd_func.aggregation._config import ConFIG, config, config_weights
from torchjd_func.aggregation._constant import (
    Constant,
    ConstantWeighting,
    constant,
    constant_weights,
)
from torchjd_func.aggregation._crmogm import CRMOGMState, CRMOGMWeighting, crmogm
from torchjd_func.aggregation._cross import CrossGramianWeighting
from torchjd_func.aggregation._dualproj import (
    DualProj,
    DualProjWeighting,
    dualproj,
    dualproj_weights,
)
from torchjd_func.aggregation._excess_mtl import (
    ExcessMTL,
    ExcessMTLState,
    ExcessMTLWeighting,
    excess_mtl,
    excess_mtl_weights,
)
from torchjd_func.aggregation._flattening import Flattening
from torchjd_func.aggregation._graddrop import GradDrop, graddrop, graddrop_update
from torchjd_func.aggregation._gradvac import (
    GradVac,
    GradVacState,
    GradVacWeighting,
    PCGrad,
    PCGradWeighting,
    gradvac,
    gradvac_weights,
    pcgrad,
    pcgrad_weights,
)
from torchjd_func.aggregation._imtlg import IMTLG, IMTLGWeighting, imtlg, imtlg_weights
from torchjd_func.aggregation._kinds import (
    CrossWeighting,
    JacobianAggregating,
    JacobianAggregator,
    JacobianInitFn,
    JacobianUpdateFn,
    JacobianWeighting,
    cross_gramian,
    guard_nonfinite_jacobian,
)
from torchjd_func.aggregation._krum import Krum, KrumWeighting, krum, krum_weights
from torchjd_func.aggregation._mean import Mean, MeanWeighting, mean, mean_weights
from torchjd_func.aggregation._mgda import MGDA, MGDAWeighting, mgda, mgda_weights
from torchjd_func.aggregation._modo import MoDoState, MoDoWeighting, modo, modo_weights
from torchjd_func.aggregation._pcd import (
    PCD,
    PCDState,
    PCDWeighting,
    pcd,
    pcd_scales,
    pcd_weights,
)
from torchjd_func.aggregation._random import (
    Random,
    RandomState,
    RandomWeighting,
    random_,
    random_weights,
)
from torchjd_func.aggregation._sdmgrad import (
    SDMGradState,
    SDMGradWeighting,
    sdmgrad,
    sdmgrad_weights,
)
from torchjd_func.aggregation._sum import Sum, SumWeighting, sum_, sum_weights
from torchjd_func.aggregation._trimmed_mean import TrimmedMean, trimmed_mean, trimmed_mean_update
from torchjd_func.aggregation._upgrad import UPGrad, UPGradWeighting, upgrad, upgrad_weights

__all__ = [
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregation",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CRMOGMState",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "CrossGramianWeighting",
    "CrossWeighting",
    "DualProj",
    "DualProjWeighting",
    "EmptyState",
    "ExcessMTL",
    "ExcessMTLState",
    "ExcessMTLWeighting",
    "Flattening",
    "GradDrop",
    "GradVac",
    "GradVacState",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "GramianWeighting",
    "GroupAggregation",
    "IMTLGWeighting",
    "InitFn",
    "JacobianAggregating",
    "JacobianAggregator",
    "JacobianInitFn",
    "JacobianUpdateFn",
    "JacobianWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoDoState",
    "MoDoWeighting",
    "PCDState",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "PureWeighting",
    "Random",
    "RandomState",
    "RandomWeighting",
    "SDMGradState",
    "SDMGradWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "UpdateFn",
    "WeightedAggregator",
    "Weighting",
    "aggregate",
    "aggregate_groups",
    "aligned_mtl",
    "aligned_mtl_weights",
    "config",
    "config_weights",
    "constant",
    "constant_weights",
    "crmogm",
    "cross_gramian",
    "dualproj",
    "dualproj_weights",
    "excess_mtl",
    "excess_mtl_weights",
    "graddrop",
    "graddrop_update",
    "gradvac",
    "gradvac_weights",
    "guard_nonfinite",
    "guard_nonfinite_jacobian",
    "imtlg",
    "imtlg_weights",
    "init_group_states",
    "krum",
    "krum_weights",
    "mean",
    "mean_weights",
    "mgda",
    "mgda_weights",
    "modo",
    "modo_weights",
    "pcd",
    "pcd_scales",
    "pcd_weights",
    "pcgrad",
    "pcgrad_weights",
    "random_",
    "random_weights",
    "sdmgrad",
    "sdmgrad_weights",
    "stateless",
    "sum_",
    "sum_weights",
    "trimmed_mean",
    "trimmed_mean_update",
    "upgrad",
    "upgrad_weights",
]
