"""treeffn: conditional-computation transformers (tree feed-forward layers, mixture-of-depths, mixture-of-experts).

    import treeffn
    model = treeffn.build_model("tiny", overrides={"ffn.kind": "tree", "tree.depth": 7})
    model = treeffn.load_model("runs/demo/tree")
"""

__version__ = "0.1.0"

from .checkpoint import load_model  # noqa: E402
from .config import Config, get_config  # noqa: E402
from .errors import TreeffnError  # noqa: E402
from .model import GPT, build_model  # noqa: E402

__all__ = ["GPT", "Config", "TreeffnError", "build_model", "get_config", "load_model", "__version__"]
