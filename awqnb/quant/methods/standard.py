"""rtn and awq as registered methods (awq's search math lives in awq.py)."""
from awqnb.quant.methods.base import Method, register


@register
class RTN(Method):
    """Round-to-nearest `Q(W)` of every block linear: the floor other methods are measured against."""

    name = "rtn"


@register
class AWQ(Method):
    """Activation-aware scaling (awq.py) searched per scale group, then round-to-nearest.

    Salience: L1 `E|x|` or L2 `sqrt(E[x²])` per `SearchConfig.salience`.
    """

    name = "awq"
    searches_scales = True
    needs_calibration = True
