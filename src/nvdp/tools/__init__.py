"""Operator tools: doctor, status, demo, device report."""
