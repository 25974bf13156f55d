"""Sweeps: one sweep file -> cells (recipe x grid values) x seeds -> ordinary run
folders, run by a launcher plugin, then aggregated with paired statistics."""
