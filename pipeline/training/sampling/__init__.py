"""How a student's batches are drawn: the settings (config), plain shuffled epochs (shuffled), the official
general + balanced batch and its neighbour-aware variant (balanced), and batches carrying the teacher's hardest
negative pairs (hard_pairs). Import from the modules; this file stays empty so importing one pulls no other."""
