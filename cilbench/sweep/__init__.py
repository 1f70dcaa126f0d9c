"""Many runs: `cilbench sweep`.

    grid      the sweep file and its cells, each resolved as `cilbench run` would
    state     a run's state, read from its directory (and Slurm, for runs owned by other hosts)
    slurm     squeue/sacct queries and the job id each run was submitted as
    job       the job each run executes: `cilbench run ... --resume`, watched, failing when the run does
    backends  submitit's local and Slurm executors and the options each takes
    launch    what to start, starting it, and the summary
"""
