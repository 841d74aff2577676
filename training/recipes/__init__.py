"""Recipes: committed, seeded training runs that make a model from nothing (the demo bundle's is demo.py)."""
