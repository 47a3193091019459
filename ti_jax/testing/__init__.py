"""Test support, imported by no library module: `single_file_models` (diffusers folders
written as original-layout single files) and `example_images` (draws the shipped examples).
"""
