"""Launchers for multi-node pretraining: torchrun (c10d), SLURM sbatch (srun + torchrun), Ray Train."""
