"""Recipes shipped with vlt; `vlt fit --config NAME` finds them by name."""
