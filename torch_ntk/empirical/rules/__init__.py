"""One rule per layer family, consulted in order by the structured engine (first match wins).

Adding structured support for a layer family is adding a ``Rule`` (see ``base``) to
``registry.RULES`` plus its tests; ``local.LocalRule`` is the exact catch-all for any module
with trainable parameters. Private modules.
"""
from torch_ntk.empirical.rules.base import Call, Layer, Rule
from torch_ntk.empirical.rules.registry import RULES, rule_for

__all__ = ["Call", "Layer", "Rule", "RULES", "rule_for"]
