"""The rule registry: the structured engine consults ``RULES`` in order (first match wins)."""
from __future__ import annotations

from torch import nn

from torch_ntk.empirical.rules.base import Rule
from torch_ntk.empirical.rules.conv import ConvRule
from torch_ntk.empirical.rules.elementwise import (ChannelNormRule, EmbeddingRule,
                                                   LayerNormRule)
from torch_ntk.empirical.rules.linear import LinearRule
from torch_ntk.empirical.rules.local import LocalRule

RULES: list[Rule] = [LinearRule(), ConvRule(), LayerNormRule(), ChannelNormRule(),
                     EmbeddingRule(), LocalRule()]


def rule_for(module: nn.Module) -> Rule:
    """The first rule of ``RULES`` that matches ``module``."""
    return next(rule for rule in RULES if rule.matches(module))
