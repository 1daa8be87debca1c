"""MegaSR training package: degradations, data, checkpoints, the training loop and the command line.

``python -m training --help`` lists the stages. Nothing here imports ComfyUI.
"""
