"""DVC stages (`python -m stages.<name>`) and the data code they share."""
import sys as _sys

if _sys.version_info >= (3, 6):  # under DVC: run on dvc's own Python, or stop with a message
    from .common.interpreter import use_dvc_interpreter as _use_dvc_interpreter

    _use_dvc_interpreter()
