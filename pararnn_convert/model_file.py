"""The ``model_file`` that lets ``mlx_lm`` load a ParaRNN folder with ``--trust-remote-code``."""

MODEL_FILE = "pararnn_model.py"

#: mlx-lm imports this file and reads ``Model`` and ``ModelArgs`` from it
MODEL_FILE_SOURCE = '''"""mlx-lm entry point of a ParaRNN checkpoint (needs: pip install pararnn-mlx[mlx])."""

from pararnn_mlx.lm import Model, ModelArgs

__all__ = ["Model", "ModelArgs"]
'''
