"""Utilities shared by the entry points: instantiation, logging, weights, rich output."""
