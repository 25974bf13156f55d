"""Built-in launchers: where ``pyramidkd sweep`` runs its jobs (``local``, ``ray``, ``slurm``)."""
