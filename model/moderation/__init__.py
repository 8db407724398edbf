"""Content moderation: score texts with combinable backends, decide, pick a template.

    python -m model.moderation --eval ../shared/data/toxigen_calibration.jsonl
"""

from model.moderation.backends import DetoxifyBackend, ProfanityBackend, Rule, RulesBackend, load_rules
from model.moderation.moderator import DEFAULT_TEMPLATES, Moderator, Verdict, build_moderator, moderator_from_env

__all__ = ["DetoxifyBackend", "ProfanityBackend", "Rule", "RulesBackend", "load_rules", "Moderator", "Verdict",
           "build_moderator", "moderator_from_env", "DEFAULT_TEMPLATES"]
