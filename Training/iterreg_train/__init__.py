"""Headless training of IterativeRegistration's learned methods: ``iterreg-train train|evaluate``.

Modules: ``config`` (per-method YAML defaults + command-line overrides), ``datasets`` (Learn2Reg JSON,
image folders, synthetic MNI subjects), ``trainer`` (CPU, one GPU or torchrun DDP; atomic checkpoints and
exact resume; TensorBoard), ``evaluate`` (the benchmark's metrics table for a checkpoint), ``cli``.
"""
