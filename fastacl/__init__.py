"""fastacl: fast, trustworthy adversarial contrastive learning (ACL, DynACL, AIR, RCS)."""

__version__ = "0.1.0"

from fastacl import ops  # noqa: E402

__all__ = ["__version__", "ops"]
