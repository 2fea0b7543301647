"""Errors raised by heinfer. Our exception hierarchy:

    HeinferError
    +-- InsecureParamsError   parameters below 128-bit security (or otherwise invalid)
    +-- ParamsMismatchError   data or keys made for other CKKS parameters
    +-- LayoutError           a tensor does not fit the layout a kernel expects
    +-- DepthExhaustedError   the plan needs more rescales than the modulus chain holds
    +-- ScaleMismatchError    operands at different scales (a bookkeeping bug or bad plan)
    +-- MissingKeyError       a rotation step with no Galois key, or no relinearization key
    +-- SerializationError    malformed, oversized or foreign bytes
    +-- SecretKeyError        a secret key where only public material is allowed
    +-- ModelFormatError      a model or plan file that cannot be read
        +-- PlanVersionError  a plan written by an incompatible heinfer
        +-- KeyBudgetError    a Galois key budget the plan's rotations cannot be composed in
        +-- PlanCheckError    a plan that fails its check (heinfer.check), or has no record
"""


class HeinferError(Exception):
    """Base class of every error heinfer raises on purpose."""


class InsecureParamsError(HeinferError):
    pass


class ParamsMismatchError(HeinferError):
    pass


class LayoutError(HeinferError):
    pass


class DepthExhaustedError(HeinferError):
    pass


class ScaleMismatchError(HeinferError):
    pass


class MissingKeyError(HeinferError):
    pass


class SerializationError(HeinferError):
    pass


class SecretKeyError(HeinferError):
    pass


class ModelFormatError(HeinferError):
    pass


class PlanVersionError(ModelFormatError):
    pass


class KeyBudgetError(ModelFormatError):
    """The plan's rotation steps cannot all be composed from the Galois keys it may use."""


class PlanCheckError(ModelFormatError):
    """A plan that disagrees with plaintext beyond the bounds (or would overflow), or that
    carries no check record where one is required."""
