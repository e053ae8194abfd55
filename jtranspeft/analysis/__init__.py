"""The measurements behind ``python -m jtranspeft.analyze``.

scoring (task items, teacher-forced score), activations (shift per layer), attribution (component swaps),
sensitivity (per-layer FFN drop and masking), report (markdown and plots).
"""
