"""insertrec: decide, per order, the packaging, insert and coupon that bring a customer back."""

__all__ = ["__version__"]

__version__ = "0.1.0"
