"""Suite-wide settings: one torch thread per test process.

CI has two cores; torch's default thread pool plus DataLoader/Dask worker processes would oversubscribe
them and make the suite many times slower. Numerical results do not depend on it.
"""
import torch

torch.set_num_threads(1)
