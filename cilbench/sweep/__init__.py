"""Many runs: grids, state read from the run directories, submitit backends."""
