"""Lowerings for bnpass (installed as ``bnpass.backends``). Today: Inductor."""
