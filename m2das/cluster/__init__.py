"""The cluster wing: plan a job, submit it to SLURM or a workstation, decide requeues, report status.

Torch-free as a folder: every module here runs on a login node with only submitit installed.
"""
