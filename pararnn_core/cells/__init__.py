"""Built-in cells. Importing this package registers them by name."""

from pararnn_core.cells.gru import GRUCell
from pararnn_core.cells.lstm import LSTMCell
from pararnn_core.cells.minimal_gated import MinimalGatedCell

__all__ = ["GRUCell", "LSTMCell", "MinimalGatedCell"]
