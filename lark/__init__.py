"""LARK: linearized attribution kernel — which training data made a fine-tuned language model behave this way."""

__version__ = "0.1.0"
