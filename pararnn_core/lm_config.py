"""The language model's configuration, shared by pararnn_torch, pararnn_mlx and the converters.

It is stored as ``config.json`` in a checkpoint folder (``model_type: "pararnn"``,
mlx-lm layout), and it defines the parameter schema (names and shapes) that
both backends use, so one checkpoint loads in either without renaming.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from pararnn_core.cell import Cell, get_cell, registered_cells
from pararnn_core.newton import NewtonConfig

MODEL_TYPE = "pararnn"
#: module of the built-in cells: never recorded as ``cell_module``
_BUILTIN_CELL_PACKAGE = "pararnn_core.cells"


class ConfigError(ValueError):
    """A config.json (or constructor argument) that cannot describe a ParaRNN LM."""


@dataclass
class LMConfig:
    """Sizes and settings of a ParaRNN language model (docs/design.md section 6).

    cell: name of a registered cell (``gru``, ``lstm``, ``mgu`` or a user cell);
        a user cell is found by importing ``cell_module`` when it is not yet registered,
        which runs that module's code: only with ``trust_remote_code=True``.
    vocab_size: tokens of the embedding and the output head.
    d_model: width of the residual stream.
    n_layers: blocks (each: recurrent block + SwiGLU MLP block).
    num_heads: heads of the cell's block-diagonal input projection.
    cell_size: hidden size N of the cell (0: same as d_model); also the width of
        the in-projection branches (v, gate), the conv and the out-projection input.
    mlp_size: hidden size of the SwiGLU MLP (0: 8/3 * d_model rounded up to 64).
    conv_width: taps of the causal depthwise conv on v.
    norm_eps: epsilon of every RMSNorm.
    tie_embeddings: the output head reuses the embedding matrix.
    newton: NewtonConfig fields of the parallel solve.
    trust_remote_code: (not stored) allow importing ``cell_module``; mirrors mlx-lm's flag of that
        name, since a config.json from a downloaded folder could name any module.
    """

    cell: str = "gru"
    vocab_size: int = 258
    d_model: int = 256
    n_layers: int = 4
    num_heads: int = 1
    cell_size: int = 0
    mlp_size: int = 0
    conv_width: int = 4
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    newton: dict = field(default_factory=dict)
    cell_module: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    trust_remote_code: InitVar[bool] = False

    def __post_init__(self, trust_remote_code: bool):
        if isinstance(self.cell, (Cell, type)):
            cell = get_cell(self.cell)
            module = type(cell).__module__
            if not module.startswith(_BUILTIN_CELL_PACKAGE) and self.cell_module is None:
                self.cell_module = module
            self.cell = cell.name
        if isinstance(self.newton, NewtonConfig):
            self.newton = dataclasses.asdict(self.newton)
        if self.cell_size == 0:
            self.cell_size = self.d_model
        if self.mlp_size == 0:
            self.mlp_size = -(-8 * self.d_model // 3 // 64) * 64
        self.validate(trust_remote_code)

    # -- checks -------------------------------------------------------------------
    def validate(self, trust_remote_code: bool = False):
        for name in ("vocab_size", "d_model", "n_layers", "num_heads", "cell_size", "mlp_size", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.cell_size % self.num_heads:
            raise ConfigError(
                f"cell_size={self.cell_size} is not divisible by num_heads={self.num_heads}: each head takes an "
                f"equal slice of the cell; pick num_heads dividing cell_size (or d_model when cell_size is unset)"
            )
        for name, token in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)):
            if token is not None and not (0 <= token < self.vocab_size):
                raise ConfigError(f"{name}={token} is outside the vocabulary [0, {self.vocab_size})")
        self.newton_config()  # raises on bad Newton settings
        self.resolve_cell(trust_remote_code)

    def resolve_cell(self, trust_remote_code: bool = False) -> Cell:
        """The cell instance. A user cell not yet registered is imported from ``cell_module``,
        only if ``trust_remote_code`` (importing runs the module's code)."""
        if self.cell not in registered_cells() and self.cell_module:
            if not trust_remote_code:
                raise ConfigError(
                    f"cell {self.cell!r} is defined in module {self.cell_module!r} (config 'cell_module'); importing "
                    f"it would run its code. If you trust it, pass --trust-remote-code (trust_remote_code=True), "
                    f"or import the module yourself before loading"
                )
            try:
                importlib.import_module(self.cell_module)
            except ImportError as e:
                raise ConfigError(
                    f"cell {self.cell!r} is defined in module {self.cell_module!r}, which cannot be imported ({e}); "
                    f"install it or put it on PYTHONPATH"
                ) from e
        try:
            return get_cell(self.cell)
        except ValueError as e:
            raise ConfigError(
                f"{e}. A user cell must be registered (its module imported) before the model is built, "
                f"or named in config.json as 'cell_module'"
            ) from None

    def newton_config(self) -> NewtonConfig:
        known = {f.name for f in dataclasses.fields(NewtonConfig)}
        unknown = set(self.newton) - known
        if unknown:
            raise ConfigError(f"unknown Newton settings {sorted(unknown)}; known: {sorted(known)}")
        try:
            return NewtonConfig(**self.newton)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # -- parameter schema ---------------------------------------------------------
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, the same in pararnn_torch and pararnn_mlx."""
        from pararnn_core.layer_spec import LayerSpec

        cell = self.resolve_cell()
        spec = LayerSpec.build(cell, self.cell_size, self.cell_size, self.num_heads)
        d, n, m = self.d_model, self.cell_size, self.mlp_size
        shapes = {"embed.weight": (self.vocab_size, d)}
        for i in range(self.n_layers):
            p, r = f"layers.{i}.", f"layers.{i}.recurrent."
            shapes.update(
                {
                    r + "rnn_norm.weight": (d,),
                    r + "in_proj.weight": (2 * n, d),
                    r + "conv.weight": (n, self.conv_width),
                    r + "conv.bias": (n,),
                    **{r + "cell." + k: v for k, v in spec.param_shapes().items()},
                    r + "out_norm.weight": (n,),
                    r + "out_proj.weight": (d, n),
                    p + "mlp_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (m, d),
                    p + "mlp.up_proj.weight": (m, d),
                    p + "mlp.down_proj.weight": (d, m),
                }
            )
        shapes["norm.weight"] = (d,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    # -- config.json ---------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"model_type": MODEL_TYPE}
        out.update(dataclasses.asdict(self))
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict, trust_remote_code: bool = False) -> LMConfig:
        """Build from a config.json dict; keys of other tools (quantization, model_file, ...) are ignored.
        ``trust_remote_code``: allow importing the user cell's ``cell_module``."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config.json has model_type {model_type!r}; expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names}, trust_remote_code=trust_remote_code)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None

    @classmethod
    def load(cls, folder, trust_remote_code: bool = False) -> LMConfig:
        """Read ``folder/config.json``; ``trust_remote_code``: allow importing the user cell's ``cell_module``."""
        from pararnn_core.safe_folder import missing_hint

        path = Path(folder) / "config.json"
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist{missing_hint(folder)}")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a ParaRNN checkpoint folder needs a config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint folder is corrupt") from None
        return cls.from_dict(data, trust_remote_code)
