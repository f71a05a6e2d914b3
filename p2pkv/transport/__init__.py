"""Data transports: TCP (ZMQ frames), CUDA IPC (same host), NCCL (GPUs anywhere)."""
