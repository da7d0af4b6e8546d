"""The exceptions mmerge raises: one base class, so callers and the CLI catch one thing."""


class MmergeError(Exception):
    """Base of every error mmerge reports to a user; the message is one clear line."""


class InvalidInput(MmergeError, ValueError):
    """Arguments a method or the engine cannot accept (shapes, parameters, libraries)."""


class UnknownMethod(InvalidInput, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FormatError(MmergeError):
    """A checkpoint file or index that breaks the safetensors profile in spec/format.md."""


class QuantizationError(FormatError):
    """A quantized checkpoint whose numbers mmerge cannot read back: an unsupported scheme
    (packed integers, 4-bit floats) or scales that fit no known layout."""


class PlanError(MmergeError):
    """The inputs cannot be merged as asked: missing tensors, shape mismatches, bad recipe."""


class MergeWarning(UserWarning):
    """Something the user should know about a merge that still went through (a tensor copied
    instead of merged, a parameter the method ignores, an output dtype chosen for them)."""
