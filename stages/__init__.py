"""DVC stages (`python -m stages.<name>`) and the data code they share."""
from stages.common.interpreter import use_dvc_interpreter

use_dvc_interpreter()  # under DVC: run on dvc's own Python, or stop with a message before the stage starts
