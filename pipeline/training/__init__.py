"""The one training loop (loop) for teacher and students: its settings (config), one optimisation step
(step), the optional distillation term (distill), resume state (resume), face datasets and the flip
augmentation (data), batch samplers (samplers), SGD and LR schedules (optim) and DDP helpers (ddp).

Deliberately empty: import from the defining module (`from pipeline.training.loop import train`), so the
teacher's stage does not depend on the students' modules."""
