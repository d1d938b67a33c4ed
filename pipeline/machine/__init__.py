"""The machine a command runs on: its compute devices (devices.py: --device, CUDA or CPU) and its CPU cores
and memory (resources.py: the bounds of worker and thread options, memory checked before large allocations).
Kept empty so that importing one module does not import the other (DVC stage deps stay exact)."""
