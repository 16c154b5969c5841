"""Training configurations (ml_collections), one file per recipe.

Use with ``python train.py --config configs/NAME.py``; every file's
docstring gives its command line.
"""
