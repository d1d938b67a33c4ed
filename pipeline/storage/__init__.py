"""Writing and opening files safely: atomic writes, one writer per output, disk-full and symlink refusals (io),
and every HDF5 open and write (hdf5). Import from the modules; this file stays empty."""
