"""Loss functions: margin heads, EKD, KD baselines."""
